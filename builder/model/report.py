"""The optimization report: dataclasses, report.json (read and write), tables."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from builder.core.errors import ModelError
from builder.model.gates import GateResult

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class CandidateResult:
    """One built-and-measured model file; figures are None when it failed to build."""

    name: str
    precision: str
    path: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    accuracy: float | None = None
    agreement: float | None = None
    load_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    speedup: float | None = None
    gates: tuple[GateResult, ...] = ()
    passed: bool = False
    error: str | None = None
    notes: tuple[str, ...] = ()
    # Where it was measured: the execution provider (with the OpenVINO device), e.g.
    # "OpenVINOExecutionProvider(CPU)"; None in reports from before per-runtime measurements.
    runtime: str | None = None
    # Largest |output - the build host's CPU output| of the same file on the validation set: how far
    # the class's runtime is from the host's (the golden set is the host's outputs, or, for a class of
    # another ISA, that ISA's own: builder.model.pipeline.ship).
    max_abs_diff: float | None = None
    # False for a reference measurement (the host's CPU onnxruntime when the class ships another
    # runtime): shown, never gated.
    gated: bool = True
    # The task's figures (precision, recall, F1; CER; ...) and, per output, fidelity to FP32
    # (cosine, snr_db, max_abs_diff, cosine_min; builder.model.tasks.fidelity).
    metrics: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # int8-mixed: the nodes kept in FP32 and every step of the search ({"kept_fp32": [...],
    # "sensitivity": [[node, SQNR dB], ...], "search": [{"nodes", "score", "cosine", "passed"}]}).
    mixed: dict[str, Any] | None = None

    @property
    def cosine(self) -> float | None:
        """The worst cosine to FP32 over every output."""
        values = [v for f in self.fidelity.values() if (v := f.get("cosine")) is not None]
        return min(values) if values else None

    @property
    def snr_db(self) -> float | None:
        values = [v for f in self.fidelity.values() if (v := f.get("snr_db")) is not None]
        return min(values) if values else None

    @property
    def label(self) -> str:
        return f"{self.name} @ {self.runtime}" if self.runtime else self.name

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k not in ("gates", "notes")}
        return {**data, "gates": [g.to_dict() for g in self.gates], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateResult:
        gates = tuple(GateResult(**g) for g in data.get("gates", []))
        return cls(**{**data, "gates": gates, "notes": tuple(data.get("notes", []))})


@dataclass(frozen=True, kw_only=True)
class Report:
    model: str
    source: str
    source_sha256: str
    candidates: tuple[CandidateResult, ...]
    chosen: str | None
    reasons: tuple[str, ...]
    onnxruntime_version: str
    policy: dict[str, Any]
    gates: dict[str, Any]
    metric: str = "accuracy"
    datasets: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # The class's runtime as measured (name, version, measured_with, provider options, note) and
    # the host CPU measurements kept as a reference when the gates used that runtime's figures.
    runtime: dict[str, Any] = field(default_factory=dict)
    reference: tuple[CandidateResult, ...] = ()
    task: str = "classification"
    score: str = "accuracy"  # the task's score, which the accuracy gates apply to
    host_isa: str | None = None  # the build host's architecture (the reference rows'; None: an older report)

    @property
    def gated_isa(self) -> str | None:
        """The ISA the gated figures were measured on: the class's runtime's, else the build host's."""
        isa = self.runtime.get("isa") if self.runtime.get("measured_with") else None
        return str(isa) if isa else self.host_isa

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    def candidate(self, name: str) -> CandidateResult:
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["candidates"] = [c.to_dict() for c in self.candidates]
        data["reference"] = [c.to_dict() for c in self.reference]
        data["reasons"] = list(self.reasons)
        return data

    @property
    def note(self) -> str | None:
        """Why the gated figures are not the class's runtime on its own device, if they are not."""
        note = self.runtime.get("note")
        return note if isinstance(note, str) else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        cands = tuple(CandidateResult.from_dict(c) for c in data["candidates"])
        ref = tuple(CandidateResult.from_dict(c) for c in data.get("reference", []))
        return cls(**{**data, "candidates": cands, "reference": ref, "reasons": tuple(data["reasons"])})


def write_report(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")


def read_report(path: Path) -> Report:
    """Load report.json; a missing or malformed one is a ModelError."""
    try:
        return Report.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"{path}: no model report (run `kiln model optimize` first)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a Kiln model report: {exc}") from None


# -- tables -------------------------------------------------------------------

COLUMNS = ("", "candidate", "precision", "accuracy", "agree", "cosine", "SNR dB", "max |diff|", "size",
           "load ms", "p50 ms", "p95 ms", "speed-up", "gates")


def columns(report: Report) -> tuple[str, ...]:
    return (*COLUMNS[:3], report.score, *COLUMNS[4:])


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(report: Report) -> list[tuple[str, ...]]:
    """One row of strings per candidate and runtime, the chosen one marked with '*'.

    A candidate's reference measurement (the host's CPU onnxruntime) follows its gated row.
    """
    rows = []
    for c in report.candidates:
        rows.append(_row(c, c.name == report.chosen))
        rows += [_row(r, False) for r in report.reference if r.name == c.name]
    return rows


def _failed(c: CandidateResult) -> str:
    """The failed gates by name (the reasons under the table say each in full)."""
    if c.error:
        return c.error
    return ", ".join(dict.fromkeys(g.gate for g in c.gates if not g.passed))


def _row(c: CandidateResult, chosen: bool) -> tuple[str, ...]:
    size = "-" if c.size_bytes is None else f"{c.size_bytes / 1024:.1f} KiB"
    verdict = "reference (not gated)" if not c.gated else "pass" if c.passed else f"FAIL: {_failed(c)}"
    return ("*" if chosen else "", c.label, c.precision, _num(c.accuracy, ".4f"),
            _num(c.agreement, ".4f"), _num(c.cosine, ".4f"), _num(c.snr_db, ".1f"),
            _num(c.max_abs_diff, ".2g"), size, _num(c.load_ms, ".1f"),
            _num(c.p50_ms, ".3f"),
            _num(c.p95_ms, ".3f"), _num(c.speedup, ".2f") + ("x" if c.speedup else ""), verdict)


def _title(report: Report) -> str:
    chosen = report.chosen or "none (gate failed)"
    return f"{report.model}: {report.task}, {report.score} on {report.datasets.get('validation_samples', '?')} " \
           f"validation samples, chosen: {chosen}"


def runtime_lines(report: Report) -> list[str]:
    """Under the table: which runtime the gates used, and why not the class's own device."""
    rt = report.runtime
    if not rt:
        return []
    isa = report.gated_isa
    where = f" on {isa}" + (" (emulated: qemu-user)" if rt.get("emulated") else "") if isa else ""
    lines = [f"gated on {rt.get('measured_with', '?')}{where} ({rt.get('name', '?')} {rt.get('version', '?')})"]
    if report.reference:
        host = f" ({report.host_isa})" if report.host_isa else ""
        lines[0] += f"; reference rows: the build host's{host} onnxruntime {report.onnxruntime_version} CPU"
    return [*lines, *([f"note: {report.note}"] if report.note else [])]


def detail_lines(report: Report) -> list[str]:
    """Under the table: each candidate's task figures and the mixed-precision search."""
    lines = []
    for c in report.candidates:
        shown = {k: v for k, v in c.metrics.items() if k not in ("texts",) and not isinstance(v, list | dict)}
        if shown:
            lines.append(f"{c.name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in shown.items()))
        if c.mixed:
            kept = c.mixed.get("kept_fp32") or []
            cost = c.mixed.get("size_cost_bytes")
            lines.append(f"{c.name}: kept in FP32: {', '.join(kept) if kept else 'none'}"
                         + (f" (of {c.mixed['quantized_nodes']} quantized)" if "quantized_nodes" in c.mixed else "")
                         + (f"; {cost:+,} bytes against full INT8" if isinstance(cost, int) else "")
                         + (f"; {c.error}" if c.error else ""))
            for step in c.mixed.get("search", []):
                lines.append(f"  {len(step['nodes'])} node(s) in FP32: {report.score} "
                             f"{_num(step.get('score'), '.4f')}, cosine {_num(step.get('cosine'), '.4f')}"
                             f" -> {'pass' if step.get('passed') else 'fail'}")
    return lines


def render_table(report: Report) -> Table:
    """A rich table of every candidate; '*' marks the chosen one."""
    caption = [*detail_lines(report), *runtime_lines(report)]
    table = Table(title=_title(report), caption="\n".join(caption) or None, caption_justify="left")
    for col in columns(report):
        table.add_column(col, justify="left" if col in ("candidate", "gates") else "right",
                         no_wrap=col == "candidate")
    for row in table_rows(report):
        table.add_row(*row)
    return table


def format_table(report: Report) -> str:
    """The same table as plain text (for logs and the benchmark)."""
    rows = [columns(report), *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = [_title(report)]
    for r in rows:
        cells = [r[i].ljust(w) if i == 1 else r[i].rjust(w) for i, w in enumerate(widths)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    return "\n".join([*lines, *detail_lines(report), *runtime_lines(report)])
