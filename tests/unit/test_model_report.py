"""report.json schema, round trip and tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from builder.core.errors import ModelError
from builder.model.gates import GateResult
from builder.model.policy import Gates, OptimizationPolicy
from builder.model.report import (
    SCHEMA_VERSION,
    CandidateResult,
    Report,
    format_table,
    read_report,
    render_table,
    write_report,
)

TOP_KEYS = {"model", "source", "source_sha256", "candidates", "chosen", "reasons", "onnxruntime_version",
            "policy", "gates", "metric", "datasets", "schema_version", "runtime", "reference", "task", "score",
            "host_isa"}
CANDIDATE_KEYS = {"name", "precision", "path", "sha256", "size_bytes", "accuracy", "agreement", "load_ms",
                  "p50_ms", "p95_ms", "speedup", "gates", "passed", "error", "notes", "runtime",
                  "max_abs_diff", "gated", "metrics", "fidelity", "mixed"}


def make_report(chosen: str | None = "int8-static") -> Report:
    fp32 = CandidateResult(
        name="fp32", precision="fp32", path="digits-fp32.onnx", sha256="a" * 64, size_bytes=40_907,
        accuracy=0.9861, agreement=1.0, load_ms=1.1, p50_ms=0.05, p95_ms=0.06, speedup=1.0,
        gates=(GateResult("max_accuracy_drop", True, 0.0, 0.01),), passed=True,
    )
    int8 = CandidateResult(
        name="int8-static", precision="int8", path="digits-int8-static.onnx", sha256="b" * 64,
        size_bytes=18_884, accuracy=0.9861, agreement=1.0, load_ms=2.8, p50_ms=0.04, p95_ms=0.05,
        speedup=1.2, gates=(GateResult("max_accuracy_drop", True, 0.0, 0.01),
                            GateResult("min_int8_speedup", True, 1.2, 1.0)),
        passed=True, notes=("opset upgraded 11 -> 13 before quantization",),
    )
    broken = CandidateResult(name="fp16", precision="fp16", error="build failed: boom")
    return Report(
        model="digits", source="models/digits/digits.onnx", source_sha256="c" * 64,
        candidates=(fp32, int8, broken), chosen=chosen, reasons=("chose int8-static: smallest",),
        onnxruntime_version="1.32.0", policy=OptimizationPolicy().to_dict(), gates=Gates().to_dict(),
        datasets={"validation_samples": 360, "calibration_samples": 200},
    )


def test_schema_keys(tmp_path: Path) -> None:
    write_report(make_report(), tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data) == TOP_KEYS
    assert data["schema_version"] == SCHEMA_VERSION
    for cand in data["candidates"]:
        assert set(cand) == CANDIDATE_KEYS
        for gate in cand["gates"]:
            assert set(gate) == {"gate", "passed", "value", "limit"}
    assert data["chosen"] == "int8-static"
    assert data["policy"]["candidates"] == ["int8-static"]
    assert data["gates"]["max_accuracy_drop"] == 0.01


def test_round_trip(tmp_path: Path) -> None:
    report = make_report()
    write_report(report, tmp_path / "report.json")
    assert read_report(tmp_path / "report.json") == report


def test_gate_failed_report_has_null_choice(tmp_path: Path) -> None:
    write_report(make_report(chosen=None), tmp_path / "report.json")
    back = read_report(tmp_path / "report.json")
    assert back.chosen is None and not back.passed
    assert json.loads((tmp_path / "report.json").read_text())["chosen"] is None


def test_output_is_stable_json(tmp_path: Path) -> None:
    write_report(make_report(), tmp_path / "a.json")
    write_report(make_report(), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_read_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model report"):
        read_report(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"model": "x"}')
    with pytest.raises(ModelError, match="not a Kiln model report"):
        read_report(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ModelError, match="not a Kiln model report"):
        read_report(tmp_path / "junk.json")


def test_plain_table_marks_the_chosen_one() -> None:
    text = format_table(make_report())
    lines = text.splitlines()
    assert "chosen: int8-static" in lines[0]
    (marked,) = [line for line in lines if line.startswith("*")]
    assert "int8-static" in marked and "18.4 KiB" in marked and "1.20x" in marked
    assert "FAIL: build failed: boom" in text


def test_rich_table() -> None:
    table = render_table(make_report(chosen=None))
    assert isinstance(table, Table)
    assert table.row_count == 3
    console = Console(width=200, record=True)
    console.print(table)
    assert "none (gate failed)" in console.export_text()


# -- per-runtime measurements -----------------------------------------------------------

OV = "OpenVINOExecutionProvider(CPU)"


def runtime_report(note: str | None = None) -> Report:
    """fp32/fp16 gated under onnxruntime-openvino, the host's CPU figures kept as reference rows."""
    def cand(name: str, runtime: str, gated: bool, diff: float | None) -> CandidateResult:
        gates = (GateResult("golden_tolerance", True, diff, 0.05),) if gated and diff is not None else ()
        return CandidateResult(name=name, precision=name, path=f"digits-{name}.onnx", size_bytes=22_000,
                               accuracy=0.9861, agreement=1.0, load_ms=40.0 if gated else 1.0, p50_ms=0.02,
                               p95_ms=0.05 if gated else 0.013, speedup=1.0, gates=gates, passed=gated,
                               runtime=runtime, max_abs_diff=diff, gated=gated)
    return Report(
        model="digits", source="models/digits/digits.onnx", source_sha256="c" * 64,
        candidates=(cand("fp32", OV, True, 1.1e-05), cand("fp16", OV, True, 8.6e-06)), chosen="fp16",
        reasons=("chose fp16: pinned",), onnxruntime_version="1.32.0", policy=OptimizationPolicy().to_dict(),
        gates=Gates().to_dict(), datasets={"validation_samples": 360},
        runtime={"name": "onnxruntime-openvino", "version": "1.24.1", "measured_with": OV, "note": note},
        reference=(cand("fp32", "CPUExecutionProvider", False, None),
                   cand("fp16", "CPUExecutionProvider", False, None)),
    )


def test_table_names_each_candidate_per_runtime_gated_row_first() -> None:
    lines = format_table(runtime_report()).splitlines()
    rows = [ln for ln in lines[2:] if "digits" not in ln and " @ " in ln]
    assert len(rows) == 4
    assert f"fp32 @ {OV}" in rows[0] and "fp32 @ CPUExecutionProvider" in rows[1]
    assert rows[2].startswith("*") and f"fp16 @ {OV}" in rows[2] and "8.6e-06" in rows[2]
    assert rows[2].rstrip().endswith("pass")
    assert "fp16 @ CPUExecutionProvider" in rows[3] and rows[3].rstrip().endswith("reference (not gated)")
    assert lines[-1] == (f"gated on {OV} (onnxruntime-openvino 1.24.1); reference rows: the build host's "
                         "onnxruntime 1.32.0 CPU")


def test_table_says_when_the_class_runtime_did_not_run_its_own_provider() -> None:
    note = ("measured on CPUExecutionProvider: the class's CUDAExecutionProvider is not available on this "
            "host (onnxruntime-gpu 1.31.1 offers: CPUExecutionProvider)")
    text = format_table(runtime_report(note))
    assert text.splitlines()[-1] == f"note: {note}"
    console = Console(width=250, record=True)
    console.print(render_table(runtime_report(note)))
    shown = console.export_text()
    assert "reference (not gated)" in shown and "not available on this host" in shown


def test_runtime_report_round_trips_and_old_reports_still_read(tmp_path: Path) -> None:
    report = runtime_report("n")
    write_report(report, tmp_path / "report.json")
    assert read_report(tmp_path / "report.json") == report
    old = json.loads((tmp_path / "report.json").read_text())
    for key in ("runtime", "reference"):
        old.pop(key)
    for cand in old["candidates"]:
        for key in ("runtime", "max_abs_diff", "gated"):
            cand.pop(key)
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = read_report(tmp_path / "old.json")
    assert back.reference == () and back.note is None and back.candidates[0].label == "fp32"
    assert "gated on" not in format_table(back)
