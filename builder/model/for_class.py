"""Glue between a class spec and the model optimizer (builder.model).

`finalize_policy` maps a spec's model entry to the optimizer's frozen policy
and gates; `make_optimized_models` runs them into build/<class>/models/ and
`finalize_model_artifacts` picks what gets baked into the image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from builder.core import paths
from builder.core.errors import GateFailed, ModelError
from builder.core.files import sha256_file
from builder.core.state import StateDir, make_state_dir
from builder.model.artifact import ModelArtifact
from builder.model.fetch import ensure_sources
from builder.model.pipeline import dataset_digest, optimize_model
from builder.model.policy import Gates, OptimizationPolicy
from builder.model.report import Report, read_report
from builder.model.runtime_image import make_runtime_image, want_runtime_image, why_no_runtime_image
from builder.model.runtime_venv import make_runtime_venv, want_runtime_venv, why_not_host_runtime
from builder.model.runtimes import OPENVINO, ClassRuntime, Provider
from builder.spec.schema import HardwareClass, Model, Runtime
from kiln_device import contract

Progress = Callable[[str], None]


def finalize_policy(hc: HardwareClass, m: Model) -> tuple[OptimizationPolicy, Gates]:
    opt, val, g = m.optimization, m.validation, m.gates
    policy = OptimizationPolicy(
        precision=m.precision.value,
        graph_level=opt.graph_level,
        candidates=tuple(c.value for c in opt.candidates),
        per_channel=opt.per_channel,
        calibration_method=opt.calibration_method,
        execution_provider="CPUExecutionProvider",  # validated on the build machine's CPU
        metric=val.metric,
        task=m.task,
        postprocess=val.postprocess.model_dump(exclude_none=True),
        golden_count=val.golden_count,
        golden_tolerance=val.golden_tolerance,
        mixed_max_nodes=opt.mixed_max_nodes,
        latency_runs=opt.latency_runs,
    )
    gates = Gates(
        min_accuracy=g.min_accuracy, max_accuracy_drop=g.max_accuracy_drop,
        min_agreement=g.min_agreement, max_size_bytes=g.max_size,
        max_p95_latency_ms=g.max_p95_latency_ms, min_int8_speedup=g.min_int8_speedup,
        min_speedup=g.min_speedup,
        fidelity={out: f.model_dump(exclude_none=True) for out, f in g.fidelity.items()},
    )
    return policy, gates


def finalize_attempts(rt: Runtime) -> dict[str, tuple[tuple[Provider, ...], ...]]:
    """Per model precision, the provider lists the gate tries in order: the class's OpenVINO
    device, then OpenVINO's CPU device (this host has no iGPU); with the options the device
    uses (kiln_device.inference.provider_options: device and pinned precision hint)."""
    from kiln_device.inference import session_providers

    devices: list[str | None] = [rt.device, "CPU"] if rt.device and rt.device.upper() != "CPU" else ["CPU"]
    if OPENVINO not in rt.execution_providers:
        devices = [None]  # one try: onnxruntime says which of the class's providers it has
    runtime = contract.Runtime(name=rt.name.value, version=rt.version,
                               execution_providers=tuple(rt.execution_providers), device=rt.device)
    return {precision: tuple(tuple(session_providers(runtime, list(rt.execution_providers), precision=precision,
                                                     device=d)) for d in devices)
            for precision in ("fp32", "fp16", "int8")}


def finalize_class_runtime(hc: HardwareClass, state: StateDir, source: str) -> ClassRuntime | None:
    """The class's runtime for the gate (None: it is the host's own); its venv is made here."""
    import onnxruntime

    rt = hc.spec.runtime
    if want_runtime_image(hc):
        from builder.core.context import make_context

        why = why_no_runtime_image(hc)
        if why is not None:
            return ClassRuntime(name=rt.name.value, version=rt.version, providers=rt.execution_providers,
                                unavailable=why)
        container = make_runtime_image(make_context("podman", state=state), hc, source)
        return ClassRuntime(name=rt.name.value, version=rt.version, providers=rt.execution_providers,
                            attempts=finalize_attempts(hc.spec.runtime), container=container)
    if not want_runtime_venv(hc, "onnxruntime", onnxruntime.__version__):
        return None
    why = why_not_host_runtime(hc)
    if why is not None:
        return ClassRuntime(name=rt.name.value, version=rt.version, providers=rt.execution_providers,
                            unavailable=why)
    return ClassRuntime(name=rt.name.value, version=rt.version, providers=rt.execution_providers,
                        attempts=finalize_attempts(hc.spec.runtime), python=make_runtime_venv(hc, state, source))


def make_optimized_models(hc: HardwareClass, progress: Progress | None = None, *,
                          reuse: bool = False, state: StateDir | None = None,
                          source: str | None = None) -> list[Report]:
    """Optimize and gate every model of the class. Raises GateFailed on the first refusal.

    With `reuse`, a passing report made from the same source model, datasets,
    policy, gates and onnxruntime versions is kept as it is: latency noise must
    not flip the chosen precision between two builds of the same inputs. When the
    class ships another runtime than the host's, the candidates are measured under
    it too (a venv in `state`, from the class's wheelhouse) and gated on its figures.
    """
    root = paths.project_root()
    state = state or make_state_dir(root)  # its engine's configs too: a gate on another ISA builds an image
    ensure_sources(hc, progress)
    runtime: ClassRuntime | None = None
    reports = []
    for m in hc.spec.models:
        policy, gates = finalize_policy(hc, m)
        calibration = root / (m.optimization.calibration or m.validation.dataset)
        out = paths.model_dir(hc.name, m.name, m.version)
        cached = _current_report(out, root / m.source) if reuse else None
        if cached is not None and _same_inputs(cached, hc, policy, gates, calibration, root / m.validation.dataset):
            if progress:
                progress(f"model {m.name} {m.version}: up to date ({cached.chosen}, {out})")
            reports.append(cached)
            continue
        runtime = runtime or finalize_class_runtime(hc, state, source or f"images/{hc.file_name}")
        try:
            reports.append(optimize_model(root / m.source, calibration, root / m.validation.dataset,
                                          policy, gates, out, progress, runtime, name=m.name))
        except GateFailed as exc:
            raise exc.with_context(f"model {m.name} {m.version} of {hc.name}") from None
    return reports


def finalize_model_artifacts(hc: HardwareClass, *, require_optimized: bool = False) -> tuple[ModelArtifact, ...]:
    """What gets baked: the chosen candidate with its report and golden set when
    an optimization report for this exact source exists, else the source model (FP32)."""
    out = []
    root = paths.project_root()
    ensure_sources(hc)
    for m in hc.spec.models:
        d = paths.model_dir(hc.name, m.name, m.version)
        report = _current_report(d, root / m.source)
        if report is None:
            if require_optimized:
                raise GateFailed(f"model {m.name} {m.version} has no passing optimization report in {d}; "
                                 f"run `kiln model optimize {hc.name}`")
            out.append(ModelArtifact(name=m.name, version=m.version, precision="fp32",
                                     path=root / m.source, sha256=sha256_file(root / m.source)))
            continue
        if not (d / "golden.npz").is_file():
            raise GateFailed(f"model {m.name} {m.version} passed its gates but has no golden set: the device's "
                             "inference service and golden check run models with one input only "
                             f"(see {d / 'report.json'})")
        chosen = report.candidate(report.chosen or "")
        out.append(ModelArtifact(name=m.name, version=m.version, precision=chosen.precision,
                                 path=d / "chosen.onnx", sha256=sha256_file(d / "chosen.onnx"),
                                 extra_files=(d / "report.json", d / "golden.npz")))
    return tuple(out)


def _current_report(d: Path, source: Path) -> Report | None:
    try:
        report = read_report(d / "report.json")
    except (ModelError, OSError):
        return None
    if not report.passed or report.source_sha256 != sha256_file(source):
        return None
    if not (d / "chosen.onnx").is_file():
        return None
    if not (d / "golden.npz").is_file() and input_count(source) == 1:
        return None  # a one-input model always gets a golden set: this one is incomplete
    return report


def input_count(path: Path) -> int:
    """The model's graph inputs that are not initializers."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return sum(1 for i in model.graph.input if i.name not in weights)


def _same_inputs(report: Report, hc: HardwareClass, policy: OptimizationPolicy, gates: Gates,
                 calibration: Path, validation: Path) -> bool:
    import onnxruntime

    ds = report.datasets
    rt = hc.spec.runtime
    measured = (report.runtime.get("name"), report.runtime.get("version")) if report.runtime else None
    other = want_runtime_venv(hc, "onnxruntime", onnxruntime.__version__) or want_runtime_image(hc)
    wanted = (rt.name.value, rt.version) if other else None
    if want_runtime_image(hc) and why_no_runtime_image(hc) is None \
            and report.runtime.get("isa") != hc.spec.architecture.value:
        return False  # gated on another ISA than the class's: measure again on its own
    return (report.policy == policy.to_dict() and report.gates == gates.to_dict()
            and report.onnxruntime_version == onnxruntime.__version__ and measured == wanted
            and ds.get("calibration_sha256") == dataset_digest(calibration)
            and ds.get("validation_sha256") == dataset_digest(validation))
