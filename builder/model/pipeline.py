"""optimize_model: load -> build candidates -> measure -> gate -> choose -> ship."""

from __future__ import annotations

import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from builder.core.errors import GateFailed, ModelError
from builder.core.files import sha256_file
from builder.model import optimize as opt
from builder.model import runtimes as rts
from builder.model import tasks
from builder.model import validate as val
from builder.model.data import MANIFEST, Dataset, Signature, check_fits, head, load_dataset, load_onnx, signature
from builder.model.gates import GateResult, Metrics, decide, evaluate, golden, speedup
from builder.model.policy import CANDIDATE_PRECISION, Gates, OptimizationPolicy
from builder.model.report import CandidateResult, Report, write_report
from builder.model.runtimes import ClassRuntime

Progress = Callable[[str], None]
OUTPUTS = ("report.json", "chosen.onnx", "golden.npz")
SERVICE_MAX_BODY = 16 * 2**20  # kiln_device.server.MAX_BODY
JSON_BYTES_PER_VALUE = 24  # a float32 as JSON text, with its separator, at worst


@dataclass(frozen=True)
class Inputs:
    path: Path
    proto: onnx.ModelProto
    sig: Signature
    calibration: Dataset
    validation: Dataset
    calibration_path: Path
    validation_path: Path
    task: str = "classification"
    post: tasks.Postprocess = field(default_factory=tasks.Postprocess)
    table: tuple[str, ...] | None = None  # text-recognition: the CTC classes
    label: str | None = None  # the model's name in the spec (default: the file's stem)

    @property
    def name(self) -> str:
        return self.label or self.path.stem

    @property
    def graded(self) -> bool:
        """Whether the task metric runs (ground truth given, a task that has one)."""
        return self.task != "fidelity" and self.validation.truth is not None

    @property
    def score(self) -> str:
        return tasks.SCORE.get(self.task, "accuracy")


@dataclass
class Built:
    """A candidate file (or the reason it could not be made)."""

    name: str
    path: Path | None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    mixed: dict[str, Any] | None = None  # int8-mixed: the nodes kept in FP32 and the search


@dataclass
class Measured:
    built: Built
    session: ort.InferenceSession
    outputs: val.Outputs
    load_ms: float


def _quiet(_message: str) -> None:
    return None


def optimize_model(model: Path, calibration: Path, validation: Path, policy: OptimizationPolicy,
                   gates: Gates, outdir: Path, progress: Progress | None = None,
                   runtime: ClassRuntime | None = None, name: str | None = None) -> Report:
    """Optimize, validate and gate one model; write the artifacts into `outdir`.

    `name` (default: the file's stem) names the report and the candidate files.

    With `runtime` (the class ships another onnxruntime build), every candidate is measured
    under it too and the gates apply to those figures; the host's CPU figures stay in the
    report as a reference. Raises ModelError for unusable inputs and GateFailed (after
    writing report.json) when no candidate passes.
    """
    say = progress or _quiet
    inputs = load_inputs(model, calibration, validation, policy)
    check_gates(inputs, gates)
    if name is not None:
        inputs = replace(inputs, label=name)
    check_device_limits(inputs, policy)  # before any candidate: a limit the device applies fails in seconds
    outdir.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUTS:
        (outdir / stale).unlink(missing_ok=True)
    built = build_candidates(inputs, policy, outdir, say, gates)
    report, under = measure_and_decide(inputs, built, policy, gates, say, runtime)
    if report.chosen is None:
        write_report(report, outdir / "report.json")
        raise _gate_failed(report, outdir)
    target = under if runtime is not None and runtime.container is not None else None
    try:
        ship(report, inputs, policy, outdir, target)
    except ModelError as exc:  # the report never says "chosen" for a model that did not ship
        for made in OUTPUTS[1:]:
            (outdir / made).unlink(missing_ok=True)
        why = f"{report.chosen} passed its gates but did not ship: {exc.message}"
        write_report(replace(report, chosen=None, reasons=(*report.reasons, why)), outdir / "report.json")
        raise
    write_report(report, outdir / "report.json")
    say(f"chose {report.chosen}")
    return report


def check_device_limits(inputs: Inputs, policy: OptimizationPolicy) -> None:
    """What the device will refuse, refused now: each golden sample must fit the service's one request."""
    data = inputs.validation
    if data.x is None and len(inputs.sig.inputs) == 1:
        check_golden_fits(head(data, min(policy.golden_count, len(data))), inputs.sig, data)


def load_inputs(model: Path, calibration: Path, validation: Path,
                policy: OptimizationPolicy) -> Inputs:
    proto = load_onnx(model)
    sig = signature(proto, model)
    cal = load_dataset(calibration, labels=False)
    check_fits(sig, cal, calibration)
    vset = load_dataset(validation, labels=policy.task == "classification")
    check_fits(sig, vset, validation)
    val.check_provider(policy.execution_provider)
    try:
        post = tasks.Postprocess(**policy.postprocess)
    except TypeError as exc:
        raise ModelError(f"postprocess: {_first(exc)}") from None
    sig.output(post.output)
    if vset.truth is None and policy.task not in ("fidelity",):
        raise ModelError(f"{validation}: task {policy.task} needs ground truth ('truth' for every sample in "
                         "dataset.json), or set the model's task to fidelity")
    if vset.truth is not None:
        tasks.check_truth(policy.task, vset.truth, vset.where)
    table = None
    if policy.task == "text-recognition":
        metadata = {p.key: p.value for p in proto.metadata_props}
        classes = dict((o.name, o.shape) for o in sig.outputs)[sig.output(post.output)]
        base = validation if validation.is_dir() else validation.parent
        table = tuple(tasks.charset(post, metadata, lambda rel: _read_text(_inside(base, rel)),
                                    classes[-1] if classes else None))
    return Inputs(model, proto, sig, cal, vset, calibration, validation, policy.task, post, table)


def check_gates(inputs: Inputs, gates: Gates) -> None:
    """Gates that could never apply are errors, not silence."""
    unknown = sorted(set(gates.fidelity) - {"*", *inputs.sig.output_names})
    if unknown:
        raise ModelError(f"{inputs.path}: gates.fidelity names {', '.join(map(repr, unknown))}, not an output "
                         f"of the model (outputs: {', '.join(inputs.sig.output_names)})")
    if inputs.task == "fidelity" and not any(gates.fidelity.values()):
        raise ModelError(f"{inputs.path}: task fidelity gates on fidelity alone, and gates.fidelity sets no limit",
                         hint='for example gates: {fidelity: {"*": {minCosine: 0.99}}}')


def _first(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]


def _inside(base: Path, rel: str) -> Path:
    """A file named relative to the data set's directory, and inside it."""
    path = (base / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(base.resolve()):
        raise ModelError(f"postprocess.charset: {rel!r} must name a file inside {base}")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the charset: {_first(exc)}") from None


# -- build ------------------------------------------------------------------------

def build_candidates(inputs: Inputs, policy: OptimizationPolicy, outdir: Path,
                     say: Progress, gates: Gates | None = None) -> list[Built]:
    """FP32 (graph-optimized) first, then each quantized/FP16 candidate; int8-mixed last."""
    fp32 = outdir / f"{inputs.name}-fp32.onnx"
    say(f"graph optimization ({policy.graph_level}) -> {fp32.name}")
    opt.graph_optimize(inputs.path, fp32, policy.graph_level, policy.execution_provider)
    built = [Built("fp32", fp32)]
    others = [n for n in policy.candidate_names()[1:] if n != "int8-mixed"]
    mixed = "int8-mixed" in policy.candidate_names()
    if others or mixed:
        with tempfile.TemporaryDirectory(prefix="kiln-quant-") as work:
            notes: list[str] = []
            source = opt.quantization_source(inputs.proto, Path(work), notes)
            built += [_build_one(n, source, notes, inputs, policy, outdir, say) for n in others]
            if mixed:
                built.append(_build_mixed(source, notes, built, inputs, policy, gates or Gates(), outdir,
                                          Path(work), say))
    return refuse_duplicates([b for b in built if b.name in policy.candidate_names()])


def refuse_duplicates(built: list[Built]) -> list[Built]:
    """A candidate whose file has the bytes of one before it is not offered again: two identical files would let
    latency noise pick between one model under two names (int8-mixed with no node in FP32 is int8-static)."""
    seen: dict[str, str] = {}
    for b in built:
        if b.path is None or b.error or not b.path.is_file():
            continue
        digest = sha256_file(b.path)
        if digest in seen:
            b.error = f"the same bytes as {seen[digest]} (sha256 {digest[:12]}): not offered twice"
            b.path.unlink()
            b.path = None
        else:
            seen[digest] = b.name
    return built


def _build_one(name: str, source: Path, shared_notes: list[str], inputs: Inputs,
               policy: OptimizationPolicy, outdir: Path, say: Progress) -> Built:
    dst = outdir / f"{inputs.name}-{name}.onnx"
    say(f"building {name} -> {dst.name}")
    item = Built(name, dst, list(shared_notes))
    try:
        _make(name, source, dst, inputs, policy, item.notes)
    except ModelError as exc:
        item.path, item.error = None, f"build failed: {exc.message}"
    return item


def _build_mixed(source: Path, shared_notes: list[str], built: list[Built], inputs: Inputs,
                 policy: OptimizationPolicy, gates: Gates, outdir: Path, work: Path, say: Progress) -> Built:
    """INT8 with the most sensitive nodes in FP32: a bounded search over how many to keep.

    Full static INT8 (the int8-static file when built) is analysed node by node (opt.sensitivity), over
    the nodes the quantizer quantized (a node it left in FP32 anyway changes nothing when excluded);
    then 0, 1, 2, 4, ... of the worst (up to policy.mixed_max_nodes) are left in FP32 until the accuracy
    and fidelity gates pass on the validation set. The first that passes is the candidate (speed and size
    are gated with the others); when none does, the last one tried is. With 0 nodes it is plain INT8: the
    same bytes as int8-static, which refuse_duplicates then does not offer twice. The report names the
    nodes kept in FP32 and what they cost in bytes."""
    dst = outdir / f"{inputs.name}-int8-mixed.onnx"
    item = Built("int8-mixed", dst, list(shared_notes))
    static = next((b for b in built if b.name == "int8-static" and b.path is not None and not b.error), None)
    full = static.path if static is not None and static.path is not None else work / "int8-full.onnx"
    try:
        if static is None:
            say("building int8-static for the per-node analysis")
            _make("int8-static", source, full, inputs, policy, item.notes)
        assert full is not None
        say(f"int8-mixed: per-node error analysis on {len(inputs.calibration)} calibration samples")
        ranked = opt.sensitivity(source, full, inputs.calibration, inputs.sig)
        reference = _reference_outputs(built[0], inputs, policy)
        item.mixed = {"sensitivity": [[n, db] for n, db in ranked[:policy.mixed_max_nodes]], "search": [],
                      "kept_fp32": [], "quantized_nodes": len(opt.quantized_nodes(full))}
        steps = mixed_steps(min(policy.mixed_max_nodes, len(ranked)))
        for k in steps:
            nodes = [n for n, _ in ranked[:k]]
            say(f"int8-mixed: {k} node(s) in FP32")
            opt.quantize_static(source, dst, inputs.calibration, inputs.sig, notes=item.notes,
                                per_channel=policy.per_channel, method=policy.calibration_method, exclude=nodes)
            sess = val.open_session(dst, policy.graph_level, policy.execution_provider)
            fig = _figures(val.predict(sess, inputs.sig, inputs.validation), reference, inputs, 0, 0.0)
            ref_fig = _figures(reference, reference, inputs, 0, 0.0)
            results = [g for g in evaluate("int8", fig, ref_fig, gates) if g.gate in QUALITY_GATES]
            passed = all(g.passed for g in results)
            cosines = [v for f in fig.fidelity.values() if (v := f.get("cosine")) is not None]
            item.mixed["search"].append({"nodes": nodes, "score": fig.accuracy,
                                         "cosine": min(cosines, default=None), "passed": passed})
            item.mixed["kept_fp32"] = nodes
            item.mixed["size_cost_bytes"] = dst.stat().st_size - full.stat().st_size  # over full INT8
            if passed:
                break
        if not item.mixed["kept_fp32"] and static is not None and item.mixed["search"][-1]["passed"]:
            item.error = "plain INT8 passes with no node in FP32: that model is int8-static, not offered twice"
            dst.unlink(missing_ok=True)
            item.path = None
    except ModelError as exc:
        item.path, item.error = None, f"build failed: {exc.message}"
    return item


def mixed_steps(limit: int) -> list[int]:
    """0, 1, 2, 4, ... and `limit` itself: how many of the worst nodes each step keeps in FP32 (0 first: plain INT8
    may pass, and then no node needs keeping)."""
    steps, k = [0], 1
    while k < limit:
        steps.append(k)
        k *= 2
    return [*steps, limit] if limit > 0 else steps


QUALITY_GATES = ("min_accuracy", "max_accuracy_drop", "min_agreement", "min_cosine", "min_snr_db", "max_abs_diff")


def _reference_outputs(fp32: Built, inputs: Inputs, policy: OptimizationPolicy) -> val.Outputs:
    assert fp32.path is not None
    return val.predict(val.open_session(fp32.path, policy.graph_level, policy.execution_provider),
                       inputs.sig, inputs.validation)


def _make(name: str, source: Path, dst: Path, inputs: Inputs, policy: OptimizationPolicy,
          notes: list[str]) -> None:
    if name == "int8-static":
        opt.quantize_static(source, dst, inputs.calibration, inputs.sig, notes=notes,
                            per_channel=policy.per_channel, method=policy.calibration_method)
    elif name == "int8-dynamic":
        opt.quantize_dynamic(source, dst, per_channel=policy.per_channel, notes=notes)
    else:
        opt.to_fp16(source, dst)


# -- measure and decide -------------------------------------------------------------

def measure_and_decide(inputs: Inputs, built: list[Built], policy: OptimizationPolicy, gates: Gates,
                       say: Progress, runtime: ClassRuntime | None = None) -> tuple[Report, rts.Measurement | None]:
    """The report, and what the class's runtime measured (None: the gates used the host's figures)."""
    measured = [m for b in built if (m := _measure_one(b, inputs, policy, say)) is not None]
    assert measured[0].built.name == "fp32"  # _measure_one raises when FP32 does not run
    say(f"timing {len(measured)} candidate(s), {policy.latency_runs} runs each, 1 thread")
    timing = val.latencies({m.built.name: m.session for m in measured}, inputs.sig,
                           inputs.validation, policy.latency_runs)
    results = _results(measured, timing, inputs, policy, gates)
    reference: list[CandidateResult] = []
    info = _host_runtime_info(runtime, policy)
    under = None
    if runtime is not None and runtime.runnable:
        under = _measure_runtime(runtime, measured, inputs, policy, say)
        reference = [replace(r, gates=(), passed=False, gated=False) for r in results]
        results = _runtime_results(under, measured, inputs, policy, gates, own_golden=runtime.container is not None)
        info = {**under.info, "note": under.note}
    failed = [_unbuilt(b) for b in built if b.path is None or b.error]
    ordered = sorted([*results, *failed], key=lambda c: [b.name for b in built].index(c.name))
    decision = decide(ordered, policy.pinned())
    return _report(inputs, tuple(ordered), decision.chosen, decision.reasons, policy, gates,
                   info, tuple(reference)), under


def _host_runtime_info(runtime: ClassRuntime | None, policy: OptimizationPolicy) -> dict[str, object]:
    """report.runtime when the gates use the host's figures (None: the class runs the host's runtime)."""
    if runtime is None:
        return {}
    return {**runtime.to_dict(), "measured_with": policy.execution_provider,
            "onnxruntime": ort.__version__, "isa": platform.machine(), "emulated": False,
            "note": runtime.unavailable}


def _measure_runtime(runtime: ClassRuntime, measured: list[Measured], inputs: Inputs,
                     policy: OptimizationPolicy, say: Progress) -> rts.Measurement:
    say(f"validating and timing {len(measured)} candidate(s) under {runtime.title}")
    files = [(m.built.name, CANDIDATE_PRECISION[m.built.name], m.built.path) for m in measured
             if m.built.path is not None]
    golden = head(inputs.validation, min(policy.golden_count, len(inputs.validation))) \
        if runtime.container is not None else None  # golden outputs from the class's own ISA (ship)
    return rts.measure_class_runtime(runtime, files, inputs.validation, inputs.sig,
                                     graph_level=policy.graph_level, latency_runs=policy.latency_runs,
                                     golden=golden)


def _figures(outputs: val.Outputs, reference: val.Outputs, inputs: Inputs, size: int, p95: float) -> Metrics:
    """Task score, agreement (classification), fidelity per output against the FP32 reference."""
    out = inputs.sig.output(inputs.post.output)
    fid = {name: tasks.fidelity(outputs[name], reference[name]) for name in inputs.sig.output_names}
    truth = inputs.validation.truth
    task = tasks.task_metrics(inputs.task, outputs[out], truth, inputs.post,
                              inputs.table) if truth is not None and inputs.graded else {}
    agree = tasks.agreement(outputs[out], reference[out]) if inputs.task == "classification" else None
    return Metrics(task.get(inputs.score), agree, size, p95, fid, inputs.score, task)


def _runtime_results(m: rts.Measurement, measured: list[Measured], inputs: Inputs, policy: OptimizationPolicy,
                     gates: Gates, own_golden: bool = False) -> list[CandidateResult]:
    """The gated figures: each candidate under the class's runtime, against that runtime's FP32.

    The golden-tolerance gate (the runtime's outputs within the tolerance of the host's, whose outputs
    the device replays) applies where the golden set is the host's; with `own_golden` (a class of
    another ISA, whose golden set comes from this run) the distance to the host is reported, not gated."""
    if "fp32" not in m.outputs:
        raise ModelError(f"the FP32 model does not run under {m.label}: {m.figures['fp32'].get('error')}")
    ref = m.outputs["fp32"]
    base = _figures(ref, ref, inputs, _size(measured[0].built), m.figures["fp32"]["p95_ms"])
    out = []
    for x in measured:
        name, fig = x.built.name, m.figures.get(x.built.name, {})
        if name not in m.outputs:
            out.append(replace(_unbuilt(x.built), runtime=m.label, error=f"does not run under {m.label}: "
                                                                         f"{fig.get('error')}"))
            continue
        diff = max(rts.max_abs_diff(a, b) for n in inputs.sig.output_names
                   for a, b in zip(m.outputs[name][n], x.outputs[n], strict=True))
        figures = _figures(m.outputs[name], ref, inputs, _size(x.built), fig["p95_ms"])
        out.append(_result(x, figures, base, (fig["p50_ms"], fig["p95_ms"]), gates, runtime=m.label,
                           load_ms=fig["load_ms"], diff=diff,
                           extra=() if own_golden else (golden(diff, policy.golden_tolerance),)))
    return out


def _measure_one(b: Built, inputs: Inputs, policy: OptimizationPolicy,
                 say: Progress) -> Measured | None:
    if b.path is None:
        return None
    say(f"validating {b.name} on {len(inputs.validation)} samples")
    try:
        sess = val.open_session(b.path, policy.graph_level, policy.execution_provider)
        outputs = val.predict(sess, inputs.sig, inputs.validation)
        load = val.load_ms(b.path, policy.graph_level, policy.execution_provider)
    except ModelError as exc:
        if b.name == "fp32":
            raise
        b.error = exc.message
        return None
    return Measured(b, sess, outputs, load)


def _results(measured: list[Measured], timing: dict[str, tuple[float, float]], inputs: Inputs,
             policy: OptimizationPolicy, gates: Gates) -> list[CandidateResult]:
    ref = measured[0].outputs
    try:
        figures = {m.built.name: _figures(m.outputs, ref, inputs, _size(m.built), timing[m.built.name][1])
                   for m in measured}
    except ModelError as exc:
        raise ModelError(f"{inputs.validation_path}: the {inputs.task} metric cannot be computed: "
                         f"{exc.message}") from None
    base = figures["fp32"]
    return [_result(m, figures[m.built.name], base, timing[m.built.name], gates,
                    runtime=policy.execution_provider) for m in measured]


def _size(b: Built) -> int:
    assert b.path is not None
    return b.path.stat().st_size


def _result(m: Measured, fig: Metrics, base: Metrics, timing: tuple[float, float], gates: Gates, *,
            runtime: str, load_ms: float | None = None, diff: float | None = None,
            extra: tuple[GateResult, ...] = ()) -> CandidateResult:
    b = m.built
    assert b.path is not None
    precision = CANDIDATE_PRECISION[b.name]
    results = (*evaluate(precision, fig, base, gates), *extra)
    task = {k: v for k, v in fig.task.items() if k != "texts"}
    return CandidateResult(
        name=b.name, precision=precision, path=b.path.name, sha256=sha256_file(b.path),
        size_bytes=fig.size_bytes, accuracy=fig.accuracy, agreement=fig.agreement,
        load_ms=m.load_ms if load_ms is None else load_ms, p50_ms=timing[0], p95_ms=timing[1],
        speedup=speedup(base.p95_ms, fig.p95_ms), gates=results, passed=all(g.passed for g in results),
        notes=tuple(b.notes), runtime=runtime, max_abs_diff=diff, metrics=task, fidelity=fig.fidelity,
        mixed=b.mixed,
    )


def _unbuilt(b: Built) -> CandidateResult:
    return CandidateResult(name=b.name, precision=CANDIDATE_PRECISION[b.name], error=b.error,
                           notes=tuple(b.notes), mixed=b.mixed)


def _report(inputs: Inputs, candidates: tuple[CandidateResult, ...], chosen: str | None,
            reasons: tuple[str, ...], policy: OptimizationPolicy, gates: Gates,
            runtime: dict[str, object], reference: tuple[CandidateResult, ...]) -> Report:
    datasets = {
        "calibration": str(inputs.calibration_path),
        "calibration_sha256": dataset_digest(inputs.calibration_path),
        "calibration_samples": len(inputs.calibration),
        "validation": str(inputs.validation_path),
        "validation_sha256": dataset_digest(inputs.validation_path),
        "validation_samples": len(inputs.validation),
    }
    return Report(model=inputs.name, source=str(inputs.path), source_sha256=sha256_file(inputs.path),
                  candidates=candidates, chosen=chosen, reasons=reasons,
                  onnxruntime_version=ort.__version__, policy=policy.to_dict(),
                  gates=gates.to_dict(), metric=policy.metric, datasets=datasets, runtime=runtime,
                  reference=reference, task=inputs.task, score=inputs.score, host_isa=platform.machine())


def dataset_digest(path: Path) -> str:
    """sha256 of an .npz, or of a sample directory (dataset.json and every file it names, in order)."""
    import hashlib

    if path.name == MANIFEST:
        path = path.parent
    if not path.is_dir():
        if not path.is_file():
            raise ModelError(f"{path}: data file not found")
        return sha256_file(path)
    data = load_dataset(path, labels=False)  # checks the manifest and every sample file
    h = hashlib.sha256((path / MANIFEST).read_bytes())
    for name in data.names:
        h.update(name.encode() + b"\0" + bytes.fromhex(sha256_file(path / name)))
    return h.hexdigest()


def check_golden_fits(golden: Any, sig: Any, data: Any) -> None:
    """Every golden sample fits the device's service check (one JSON request)."""
    for i, feed in enumerate(golden.samples):
        values = feed[sig.input_name].size
        if values * JSON_BYTES_PER_VALUE > SERVICE_MAX_BODY:
            raise ModelError(f"{data.where(i)}: a golden sample of {values:,} values is too big for the device's "
                             f"service check (one JSON request of at most {SERVICE_MAX_BODY // 2**20} MiB)",
                             hint="put smaller samples first in the data set, or lower validation.goldenCount")


def _ship_target_golden(target: rts.Measurement, chosen: str, inputs: Inputs, policy: OptimizationPolicy,
                        outdir: Path, count: int) -> None:
    """golden.npz from the outputs the class's runtime gave on its own ISA for the golden samples, run
    as the device's check runs them (builder.model.runtimes: one batch, not the validation's)."""
    sig, data = inputs.sig, inputs.validation
    outputs = target.golden[chosen][sig.output_name]
    if len(outputs) != count:
        raise ModelError(f"the class's runtime gave {len(outputs)} golden outputs for {chosen}, expected {count}")
    if data.x is not None:
        labels = data.y[:count] if data.y is not None else np.zeros(0)
        val.write_golden(outdir / "golden.npz", sig, data.x[:count], np.concatenate(outputs), labels,
                         policy.golden_tolerance)
        return
    if len(sig.inputs) != 1:
        return
    golden = head(data, count)
    check_golden_fits(golden, sig, data)
    val.write_golden_samples(outdir / "golden.npz", sig, list(golden.samples), list(outputs),
                             policy.golden_tolerance, argmax=inputs.task == "classification")


# -- outcome ------------------------------------------------------------------------

def _gate_failed(report: Report, outdir: Path) -> GateFailed:
    lines = "\n".join(f"  {r}" for r in report.reasons)
    return GateFailed(f"model {report.model}: no candidate can ship\n{lines}",
                      hint=f"see {outdir / 'report.json'}")


def ship(report: Report, inputs: Inputs, policy: OptimizationPolicy, outdir: Path,
         target: rts.Measurement | None = None) -> None:
    """chosen.onnx (a copy of the chosen file) and golden.npz (its outputs). With `target` (the
    class's runtime measured on the class's own ISA), the golden outputs are that run's: the device
    replays them on the same ISA, never against the build host's numbers."""
    chosen = report.candidate(report.chosen or "")
    assert chosen.path is not None
    shutil.copyfile(outdir / chosen.path, outdir / "chosen.onnx")
    count = min(policy.golden_count, len(inputs.validation))
    if target is not None:
        _ship_target_golden(target, chosen.name, inputs, policy, outdir, count)
        return
    sess = val.open_session(outdir / "chosen.onnx", policy.graph_level, policy.execution_provider)
    # The device replays these within policy.golden_tolerance. INT8 outputs agree across x86
    # CPUs only because the weights are quantized with reduce_range (see optimize.py): measured
    # max |diff| 0.0 between this AVX512-VNNI host and an AVX2 QEMU guest, 3.82 without it.
    sig, data = inputs.sig, inputs.validation
    if data.x is not None:
        x = data.x[:count]
        labels = data.y[:count] if data.y is not None else np.zeros(0)
        outputs = val.first(val.predict(sess, sig, head(data, count)), sig)
        val.write_golden(outdir / "golden.npz", sig, x, outputs, labels, policy.golden_tolerance)
        return
    if len(sig.inputs) != 1:
        return  # the device serves one-input models only: no golden set (builder.model.for_class says so at build)
    golden = head(data, count)
    check_golden_fits(golden, sig, data)
    golden_outputs = val.predict(sess, sig, golden)[sig.output_name]
    val.write_golden_samples(outdir / "golden.npz", sig, list(golden.samples), golden_outputs,
                             policy.golden_tolerance, argmax=inputs.task == "classification")

