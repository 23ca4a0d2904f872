"""The optimization report: dataclasses, report.json (read and write), tables."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from builder.errors import ModelError
from builder.model.gates import GateResult, failures

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

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    def candidate(self, name: str) -> CandidateResult:
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["candidates"] = [c.to_dict() for c in self.candidates]
        data["reasons"] = list(self.reasons)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        cands = tuple(CandidateResult.from_dict(c) for c in data["candidates"])
        return cls(**{**data, "candidates": cands, "reasons": tuple(data["reasons"])})


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

COLUMNS = ("", "candidate", "precision", "accuracy", "agree", "size", "load ms",
           "p50 ms", "p95 ms", "speed-up", "gates")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(report: Report) -> list[tuple[str, ...]]:
    """One row of strings per candidate, the chosen one marked with '*'."""
    return [_row(c, c.name == report.chosen) for c in report.candidates]


def _row(c: CandidateResult, chosen: bool) -> tuple[str, ...]:
    size = "-" if c.size_bytes is None else f"{c.size_bytes / 1024:.1f} KiB"
    verdict = "pass" if c.passed else f"FAIL: {failures(c)}"
    return ("*" if chosen else "", c.name, c.precision, _num(c.accuracy, ".4f"),
            _num(c.agreement, ".4f"), size, _num(c.load_ms, ".1f"), _num(c.p50_ms, ".3f"),
            _num(c.p95_ms, ".3f"), _num(c.speedup, ".2f") + ("x" if c.speedup else ""), verdict)


def _title(report: Report) -> str:
    chosen = report.chosen or "none (gate failed)"
    return f"{report.model}: {report.metric} on {report.datasets.get('validation_samples', '?')} " \
           f"validation samples, chosen: {chosen}"


def render_table(report: Report) -> Table:
    """A rich table of every candidate; '*' marks the chosen one."""
    table = Table(title=_title(report))
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("candidate", "gates") else "right")
    for row in table_rows(report):
        table.add_row(*row)
    return table


def format_table(report: Report) -> str:
    """The same table as plain text (for logs and the benchmark)."""
    rows = [COLUMNS, *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = [_title(report)]
    for r in rows:
        cells = [r[i].ljust(w) if i == 1 else r[i].rjust(w) for i, w in enumerate(widths)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    return "\n".join(lines)
