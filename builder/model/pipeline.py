"""optimize_model: load -> build candidates -> measure -> gate -> choose -> ship."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from builder.errors import GateFailed, ModelError
from builder.files import sha256_file
from builder.model import optimize as opt
from builder.model import runtimes as rts
from builder.model import validate as val
from builder.model.data import (
    Dataset,
    Signature,
    check_fits,
    load_dataset,
    load_onnx,
    signature,
)
from builder.model.gates import GateResult, Metrics, decide, evaluate, golden, speedup
from builder.model.policy import CANDIDATE_PRECISION, Gates, OptimizationPolicy
from builder.model.report import CandidateResult, Report, write_report
from builder.model.runtimes import ClassRuntime

Progress = Callable[[str], None]
OUTPUTS = ("report.json", "chosen.onnx", "golden.npz")


@dataclass(frozen=True)
class Inputs:
    path: Path
    proto: onnx.ModelProto
    sig: Signature
    calibration: Dataset
    validation: Dataset
    calibration_path: Path
    validation_path: Path

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class Built:
    """A candidate file (or the reason it could not be made)."""

    name: str
    path: Path | None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Measured:
    built: Built
    session: ort.InferenceSession
    outputs: np.ndarray
    load_ms: float


def _quiet(_message: str) -> None:
    return None


def optimize_model(model: Path, calibration: Path, validation: Path, policy: OptimizationPolicy,
                   gates: Gates, outdir: Path, progress: Progress | None = None,
                   runtime: ClassRuntime | None = None) -> Report:
    """Optimize, validate and gate one model; write the artifacts into `outdir`.

    With `runtime` (the class ships another onnxruntime build), every candidate is measured
    under it too and the gates apply to those figures; the host's CPU figures stay in the
    report as a reference. Raises ModelError for unusable inputs and GateFailed (after
    writing report.json) when no candidate passes.
    """
    say = progress or _quiet
    inputs = load_inputs(model, calibration, validation, policy)
    outdir.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUTS:
        (outdir / stale).unlink(missing_ok=True)
    built = build_candidates(inputs, policy, outdir, say)
    report = measure_and_decide(inputs, built, policy, gates, say, runtime)
    write_report(report, outdir / "report.json")
    if report.chosen is None:
        raise _gate_failed(report, outdir)
    ship(report, inputs, policy, outdir)
    say(f"chose {report.chosen}")
    return report


def load_inputs(model: Path, calibration: Path, validation: Path,
                policy: OptimizationPolicy) -> Inputs:
    proto = load_onnx(model)
    sig = signature(proto, model)
    cal = load_dataset(calibration, labels=False)
    check_fits(sig, cal, calibration)
    vset = load_dataset(validation, labels=True)
    check_fits(sig, vset, validation)
    val.check_provider(policy.execution_provider)
    return Inputs(model, proto, sig, cal, vset, calibration, validation)


# -- build ------------------------------------------------------------------------

def build_candidates(inputs: Inputs, policy: OptimizationPolicy, outdir: Path,
                     say: Progress) -> list[Built]:
    """FP32 (graph-optimized) first, then each quantized/FP16 candidate."""
    fp32 = outdir / f"{inputs.name}-fp32.onnx"
    say(f"graph optimization ({policy.graph_level}) -> {fp32.name}")
    opt.graph_optimize(inputs.path, fp32, policy.graph_level, policy.execution_provider)
    built = [Built("fp32", fp32)]
    others = policy.candidate_names()[1:]
    if others:
        with tempfile.TemporaryDirectory(prefix="kiln-quant-") as work:
            notes: list[str] = []
            source = opt.quantization_source(inputs.proto, Path(work), notes)
            built += [_build_one(n, source, notes, inputs, policy, outdir, say) for n in others]
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

def measure_and_decide(inputs: Inputs, built: list[Built], policy: OptimizationPolicy,
                       gates: Gates, say: Progress, runtime: ClassRuntime | None = None) -> Report:
    measured = [m for b in built if (m := _measure_one(b, inputs, policy, say)) is not None]
    assert measured[0].built.name == "fp32"  # _measure_one raises when FP32 does not run
    say(f"timing {len(measured)} candidate(s), {policy.latency_runs} runs each, 1 thread")
    timing = val.latencies({m.built.name: m.session for m in measured}, inputs.sig,
                           inputs.validation.x, policy.latency_runs)
    results = _results(measured, timing, inputs, policy, gates)
    reference: list[CandidateResult] = []
    info = _host_runtime_info(runtime, policy)
    if runtime is not None and runtime.python is not None:
        under = _measure_runtime(runtime, measured, inputs, policy, say)
        reference = [replace(r, gates=(), passed=False, gated=False) for r in results]
        results = _runtime_results(under, measured, inputs, policy, gates)
        info = {**under.info, "note": under.note}
    failed = [_unbuilt(b) for b in built if b.path is None or b.error]
    ordered = sorted([*results, *failed], key=lambda c: [b.name for b in built].index(c.name))
    decision = decide(ordered, policy.pinned())
    return _report(inputs, tuple(ordered), decision.chosen, decision.reasons, policy, gates,
                   info, tuple(reference))


def _host_runtime_info(runtime: ClassRuntime | None, policy: OptimizationPolicy) -> dict[str, object]:
    """report.runtime when the gates use the host's figures (None: the class runs the host's runtime)."""
    if runtime is None:
        return {}
    return {**runtime.to_dict(), "measured_with": policy.execution_provider,
            "onnxruntime": ort.__version__, "note": runtime.unavailable}


def _measure_runtime(runtime: ClassRuntime, measured: list[Measured], inputs: Inputs,
                     policy: OptimizationPolicy, say: Progress) -> rts.Measurement:
    say(f"validating and timing {len(measured)} candidate(s) under {runtime.title}")
    files = [(m.built.name, CANDIDATE_PRECISION[m.built.name], m.built.path) for m in measured
             if m.built.path is not None]
    return rts.measure_class_runtime(runtime, files, inputs.validation.x, batch=inputs.sig.batch,
                                     input_name=inputs.sig.input_name, output_name=inputs.sig.output_name,
                                     graph_level=policy.graph_level, latency_runs=policy.latency_runs)


def _runtime_results(m: rts.Measurement, measured: list[Measured], inputs: Inputs,
                     policy: OptimizationPolicy, gates: Gates) -> list[CandidateResult]:
    """The gated figures: each candidate under the class's runtime, against that runtime's FP32."""
    metric = val.METRICS[policy.metric]
    labels = inputs.validation.y
    assert labels is not None
    if "fp32" not in m.outputs:
        raise ModelError(f"the FP32 model does not run under {m.label}: {m.figures['fp32'].get('error')}")
    ref = m.outputs["fp32"]
    figures = {name: Metrics(metric(out, labels), val.agreement(out, ref), 0, m.figures[name]["p95_ms"])
               for name, out in m.outputs.items()}
    base = replace(figures["fp32"], size_bytes=_size(measured[0].built))
    out = []
    for x in measured:
        name, fig = x.built.name, m.figures.get(x.built.name, {})
        if name not in m.outputs:
            out.append(replace(_unbuilt(x.built), runtime=m.label, error=f"does not run under {m.label}: "
                                                                         f"{fig.get('error')}"))
            continue
        diff = rts.max_abs_diff(m.outputs[name], x.outputs)
        out.append(_result(x, replace(figures[name], size_bytes=_size(x.built)), base,
                           (fig["p50_ms"], fig["p95_ms"]), gates, runtime=m.label, load_ms=fig["load_ms"],
                           diff=diff, extra=(golden(diff, policy.golden_tolerance),)))
    return out


def _measure_one(b: Built, inputs: Inputs, policy: OptimizationPolicy,
                 say: Progress) -> Measured | None:
    if b.path is None:
        return None
    say(f"validating {b.name} on {len(inputs.validation.x)} samples")
    try:
        sess = val.open_session(b.path, policy.graph_level, policy.execution_provider)
        outputs = val.predict(sess, inputs.sig, inputs.validation.x)
        load = val.load_ms(b.path, policy.graph_level, policy.execution_provider)
    except ModelError as exc:
        if b.name == "fp32":
            raise
        b.error = exc.message
        return None
    return Measured(b, sess, outputs, load)


def _results(measured: list[Measured], timing: dict[str, tuple[float, float]], inputs: Inputs,
             policy: OptimizationPolicy, gates: Gates) -> list[CandidateResult]:
    metric = val.METRICS[policy.metric]
    labels = inputs.validation.y
    assert labels is not None
    ref = measured[0].outputs
    figures = {m.built.name: Metrics(metric(m.outputs, labels), val.agreement(m.outputs, ref),
                                     _size(m.built), timing[m.built.name][1]) for m in measured}
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
    return CandidateResult(
        name=b.name, precision=precision, path=b.path.name, sha256=sha256_file(b.path),
        size_bytes=fig.size_bytes, accuracy=fig.accuracy, agreement=fig.agreement,
        load_ms=m.load_ms if load_ms is None else load_ms, p50_ms=timing[0], p95_ms=timing[1],
        speedup=speedup(base.p95_ms, fig.p95_ms), gates=results, passed=all(g.passed for g in results),
        notes=tuple(b.notes), runtime=runtime, max_abs_diff=diff,
    )


def _unbuilt(b: Built) -> CandidateResult:
    return CandidateResult(name=b.name, precision=CANDIDATE_PRECISION[b.name], error=b.error,
                           notes=tuple(b.notes))


def _report(inputs: Inputs, candidates: tuple[CandidateResult, ...], chosen: str | None,
            reasons: tuple[str, ...], policy: OptimizationPolicy, gates: Gates,
            runtime: dict[str, object], reference: tuple[CandidateResult, ...]) -> Report:
    datasets = {
        "calibration": str(inputs.calibration_path),
        "calibration_sha256": sha256_file(inputs.calibration_path),
        "calibration_samples": len(inputs.calibration.x),
        "validation": str(inputs.validation_path),
        "validation_sha256": sha256_file(inputs.validation_path),
        "validation_samples": len(inputs.validation.x),
    }
    return Report(model=inputs.name, source=str(inputs.path), source_sha256=sha256_file(inputs.path),
                  candidates=candidates, chosen=chosen, reasons=reasons,
                  onnxruntime_version=ort.__version__, policy=policy.to_dict(),
                  gates=gates.to_dict(), metric=policy.metric, datasets=datasets, runtime=runtime,
                  reference=reference)


# -- outcome ------------------------------------------------------------------------

def _gate_failed(report: Report, outdir: Path) -> GateFailed:
    lines = "\n".join(f"  {r}" for r in report.reasons)
    return GateFailed(f"model {report.model}: no candidate can ship\n{lines}",
                      hint=f"see {outdir / 'report.json'}")


def ship(report: Report, inputs: Inputs, policy: OptimizationPolicy, outdir: Path) -> None:
    """chosen.onnx (a copy of the chosen file) and golden.npz (its outputs)."""
    chosen = report.candidate(report.chosen or "")
    assert chosen.path is not None
    shutil.copyfile(outdir / chosen.path, outdir / "chosen.onnx")
    count = min(policy.golden_count, len(inputs.validation.x))
    x = inputs.validation.x[:count]
    labels = inputs.validation.y[:count] if inputs.validation.y is not None else np.zeros(0)
    sess = val.open_session(outdir / "chosen.onnx", policy.graph_level, policy.execution_provider)
    outputs = val.predict(sess, inputs.sig, x)
    # The device replays these within policy.golden_tolerance. INT8 outputs agree across x86
    # CPUs only because the weights are quantized with reduce_range (see optimize.py): measured
    # max |diff| 0.0 between this AVX512-VNNI host and an AVX2 QEMU guest, 3.82 without it.
    val.write_golden(outdir / "golden.npz", inputs.sig, x, outputs, labels, policy.golden_tolerance)
