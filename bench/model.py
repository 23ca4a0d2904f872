"""Benchmark model optimization: FP32 vs every candidate, per example model.

    .venv/bin/python -m bench.model [--json PATH] [--runs N] [--min-int8-speedup X]
                                    [--models digits,cancer,text-detector]

Runs the real pipeline (builder.model.optimize_model) on the committed models
and data with all candidates (int8-static, int8-dynamic, int8-mixed, fp16) and prints a
table per model: task score, agreement and fidelity to FP32, size, load time, p50/p95
single-inference latency on 1 thread; '*' marks the chosen candidate. text-detector is the
OCR example (models/ocr): intel-lowpower-detector's spec entry with its own gates and
candidates, measured with the host's CPU onnxruntime, with the wall time of the full gate run.
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


def main(argv: list[str] | None = None) -> int:
    ap = make_parser("bench.model", "FP32 vs INT8/FP16 candidates on the example models")
    ap.add_argument("--runs", type=int, default=500, help="latency runs per candidate (default 500)")
    ap.add_argument("--min-int8-speedup", type=float, default=Gates().min_int8_speedup)
    ap.add_argument("--models", default="digits,cancer,text-detector")
    args = ap.parse_args(argv)
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
