"""Benchmark model optimization: FP32 vs every candidate, per example model.

    .venv/bin/python -m bench.model [--json PATH] [--runs N] [--min-int8-speedup X]
                                    [--models digits,cancer,text-detector]
    .venv/bin/python -m bench.model --sensitivity-memory 50 [--json PATH]

Runs the real pipeline (builder.model.optimize_model) on the committed models
and data with all candidates (int8-static, int8-dynamic, int8-mixed, fp16) and prints a
table per model: task score, agreement and fidelity to FP32, size, load time, p50/p95
single-inference latency on 1 thread; '*' marks the chosen candidate. text-detector is the
OCR example (models/ocr): intel-lowpower-detector's spec entry with its own gates and
candidates, measured with the host's CPU onnxruntime, with the wall time of the full gate run.

--sensitivity-memory N measures int8-mixed's per-node analysis (builder.model.optimize.sensitivity) on the
PP-OCR detector over N calibration samples of 640x480 (the det-calibration photos, each widened with its own
pixels): the peak resident memory of the process that runs it, and its wall time (issue 36: it held every
activation of both models, 8.4 GB on six such images; the goal is 2 GB at 50).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, describe_machine, make_parser, write_figures
from builder.core.errors import GateFailed, KilnError
from builder.model.pipeline import optimize_model
from builder.model.policy import CANDIDATES, Gates, OptimizationPolicy
from builder.model.report import Report, format_table, read_report

SPEC_MODELS = {"text-detector": "intel-lowpower-detector"}


def bench_spec_model(name: str, runs: int, out: Path) -> tuple[Report, float]:
    """A spec's model with its own policy and gates (the host's CPU runtime)."""
    from dataclasses import replace

    from builder.model.fetch import ensure_source
    from builder.model.for_class import finalize_policy
    from builder.spec.loader import load_class

    hc = load_class(SPEC_MODELS[name], ROOT / "images")
    m = next(m for m in hc.spec.models if m.name == name)
    source = ensure_source(m) if m.fetch else ROOT / m.source
    policy, gates = finalize_policy(hc, m)
    policy = replace(policy, latency_runs=runs)
    start = time.perf_counter()
    try:
        report = optimize_model(source, ROOT / (m.optimization.calibration or m.validation.dataset),
                                ROOT / m.validation.dataset, policy, gates, out / name, name=m.name)
    except GateFailed as exc:
        print(f"gate failed: {exc}", file=sys.stderr)
        report = read_report(out / name / "report.json")
    return report, time.perf_counter() - start


def bench_one(name: str, policy: OptimizationPolicy, gates: Gates, out: Path) -> tuple[Report, float]:
    if name in SPEC_MODELS:
        return bench_spec_model(name, policy.latency_runs, out)
    d = ROOT / "models" / name
    start = time.perf_counter()
    try:
        report = optimize_model(d / f"{name}.onnx", d / "data" / "calibration.npz",
                                d / "data" / "validation.npz", policy, gates, out / name)
    except GateFailed as exc:
        print(f"gate failed: {exc}", file=sys.stderr)
        report = read_report(out / name / "report.json")
    return report, time.perf_counter() - start


def machine() -> dict[str, Any]:
    import platform

    import onnxruntime

    return describe_machine(onnxruntime=onnxruntime.__version__, processor=platform.processor())


def sensitivity_child(source: str, int8: str, data: str) -> None:
    """In a process of its own (its peak RSS is what is measured): the analysis alone."""
    import onnx

    from builder.model import optimize as opt
    from builder.model.data import load_dataset, signature

    sig = signature(onnx.load(source), Path(source))
    ranked = opt.sensitivity(Path(source), Path(int8), load_dataset(Path(data), labels=False), sig)
    print(f"ranked {len(ranked)} nodes; worst {ranked[0] if ranked else None}")


def bench_sensitivity_memory(samples: int) -> dict[str, Any]:
    import json
    import resource
    import subprocess

    import numpy as np
    import onnx

    from builder.model import optimize as opt
    from builder.model.data import head, load_dataset, signature
    from builder.model.fetch import ensure_source
    from builder.spec.loader import load_class

    hc = load_class(SPEC_MODELS["text-detector"], ROOT / "images")
    model = ensure_source(next(m for m in hc.spec.models if m.name == "text-detector"))
    photos = load_dataset(ROOT / "models/ocr/data/det-calibration", labels=False)  # scaled as dataset.json says
    with tempfile.TemporaryDirectory(prefix="kiln-bench-sens-") as tmp:
        work = Path(tmp)
        data = work / "data"
        data.mkdir()
        names = []
        for i in range(samples):
            x = photos.samples[i % len(photos)]["x"]  # [1, 3, 480, 480]
            wide = np.concatenate([x, x[..., :160]], axis=-1)  # [1, 3, 480, 640]: real pixels, camera size
            np.savez(data / f"s{i:03d}.npz", x=np.ascontiguousarray(wide, np.float32))
            names.append({"file": f"s{i:03d}.npz"})
        (data / "dataset.json").write_text(json.dumps({"samples": names}))
        proto = onnx.load(str(model))
        sig = signature(proto, model)
        source = opt.quantization_source(proto, work, [])
        int8 = work / "int8.onnx"
        calib = head(load_dataset(data, labels=False), 4)  # the INT8 file only: its calibration is not measured
        opt.quantize_static(source, int8, calib, sig, notes=[], per_channel=True, method="minmax")
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", "import sys; from bench.model import sensitivity_child; "
                              "sensitivity_child(*sys.argv[1:])", str(source), str(int8), str(data)],
                             capture_output=True, text=True, cwd=ROOT, check=False)
        seconds = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(f"the analysis failed:\n{out.stderr[-2000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return {"samples": samples, "size": "640x480", "peakBytes": peak, "seconds": round(seconds, 1),
            "result": out.stdout.strip(), "analysedSamples": min(samples, opt.SENSITIVITY_SAMPLES)}


def main(argv: list[str] | None = None) -> int:
    ap = make_parser("bench.model", "FP32 vs INT8/FP16 candidates on the example models")
    ap.add_argument("--runs", type=int, default=500, help="latency runs per candidate (default 500)")
    ap.add_argument("--min-int8-speedup", type=float, default=Gates().min_int8_speedup)
    ap.add_argument("--models", default="digits,cancer,text-detector")
    ap.add_argument("--sensitivity-memory", type=int, default=None, metavar="N",
                    help="measure int8-mixed's per-node analysis on the detector at N samples of 640x480 instead")
    args = ap.parse_args(argv)
    if args.sensitivity_memory:
        fig = bench_sensitivity_memory(args.sensitivity_memory)
        print(f"{'samples':>8} {'size':>8} {'analysed':>9} {'peak RSS':>10} {'time':>8}")
        print(f"{fig['samples']:>8} {fig['size']:>8} {fig['analysedSamples']:>9} "
              f"{fig['peakBytes'] / 2**30:>8.2f} G {fig['seconds']:>6.1f} s   {fig['result']}")
        write_figures(args.json, {"machine": machine(), "sensitivity": fig})
        return 0
    policy = OptimizationPolicy(candidates=CANDIDATES, latency_runs=args.runs)
    gates = Gates(min_int8_speedup=args.min_int8_speedup)
    figures: dict[str, Any] = {"machine": machine(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        for name in args.models.split(","):
            try:
                report, seconds = bench_one(name, policy, gates, Path(tmp))
            except KilnError as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                return exc.exit_code
            print(format_table(report))
            print(f"  ({seconds:.1f} s; {'; '.join(report.reasons)})\n")
            figures["models"][name] = {**report.to_dict(), "optimize_seconds": seconds}
    write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
