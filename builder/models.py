"""Glue between a class spec and the model optimizer (builder.model).

`finalize_policy` maps a spec's model entry to the optimizer's frozen policy
and gates; `make_optimized_models` runs them into build/<class>/models/ and
`finalize_model_artifacts` picks what gets baked into the image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from builder import paths
from builder.errors import GateFailed, ModelError
from builder.files import sha256_file
from builder.model import Gates, OptimizationPolicy, Report, optimize_model, read_report
from builder.render import ModelArtifact
from builder.spec import HardwareClass, Model

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
        golden_count=val.golden_count,
        golden_tolerance=val.golden_tolerance,
    )
    gates = Gates(
        min_accuracy=g.min_accuracy, max_accuracy_drop=g.max_accuracy_drop,
        min_agreement=g.min_agreement, max_size_bytes=g.max_size,
        max_p95_latency_ms=g.max_p95_latency_ms, min_int8_speedup=g.min_int8_speedup,
    )
    return policy, gates


def make_optimized_models(hc: HardwareClass, progress: Progress | None = None, *,
                          reuse: bool = False) -> list[Report]:
    """Optimize and gate every model of the class. Raises GateFailed on the first refusal.

    With `reuse`, a passing report made from the same source model, datasets,
    policy, gates and onnxruntime version is kept as it is: latency noise must
    not flip the chosen precision between two builds of the same inputs.
    """
    root = paths.project_root()
    reports = []
    for m in hc.spec.models:
        policy, gates = finalize_policy(hc, m)
        calibration = root / (m.optimization.calibration or m.validation.dataset)
        out = paths.model_dir(hc.name, m.name, m.version)
        cached = _current_report(out, root / m.source) if reuse else None
        if cached is not None and _same_inputs(cached, policy, gates, calibration, root / m.validation.dataset):
            if progress:
                progress(f"model {m.name} {m.version}: up to date ({cached.chosen}, {out})")
            reports.append(cached)
            continue
        try:
            reports.append(optimize_model(root / m.source, calibration, root / m.validation.dataset,
                                          policy, gates, out, progress))
        except GateFailed as exc:
            raise exc.with_context(f"model {m.name} {m.version} of {hc.name}") from None
    return reports


def finalize_model_artifacts(hc: HardwareClass, *, require_optimized: bool = False) -> tuple[ModelArtifact, ...]:
    """What gets baked: the chosen candidate with its report and golden set when
    an optimization report for this exact source exists, else the source model (FP32)."""
    out = []
    root = paths.project_root()
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
    if not ((d / "chosen.onnx").is_file() and (d / "golden.npz").is_file()):
        return None
    return report


def _same_inputs(report: Report, policy: OptimizationPolicy, gates: Gates, calibration: Path,
                 validation: Path) -> bool:
    import onnxruntime

    ds = report.datasets
    return (report.policy == policy.to_dict() and report.gates == gates.to_dict()
            and report.onnxruntime_version == onnxruntime.__version__
            and ds.get("calibration_sha256") == sha256_file(calibration)
            and ds.get("validation_sha256") == sha256_file(validation))
