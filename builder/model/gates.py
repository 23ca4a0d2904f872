"""Gate logic, pure: measured figures + Gates -> per-gate results -> the choice.

No onnxruntime here; the unit tests drive it with tables of figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from builder.model.policy import Gates


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    value: float | None
    limit: float | None
    what: str | None = None  # the figure's name where the gate's own is generic: "f1", an output's name

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"gate": self.gate, "passed": self.passed, "value": self.value,
                                   "limit": self.limit}
        return {**data, "what": self.what} if self.what is not None else data


@dataclass(frozen=True)
class Metrics:
    """What validation measured for one candidate.

    `accuracy` is the task's score (top-1 accuracy, F1, character accuracy; None without ground
    truth), `agreement` the top-1 agreement with FP32 (classification only), `fidelity` per output
    the worst-sample figures against FP32 (builder.model.tasks.fidelity)."""

    accuracy: float | None
    agreement: float | None
    size_bytes: int
    p95_ms: float
    fidelity: dict[str, dict[str, float | None]] = field(default_factory=dict)
    score: str = "accuracy"  # what `accuracy` is
    task: dict[str, object] = field(default_factory=dict)  # every figure of the task metric


class Verdict(Protocol):
    """What the choice needs from a candidate (report.CandidateResult has it)."""

    @property
    def name(self) -> str: ...
    @property
    def size_bytes(self) -> int | None: ...
    @property
    def p95_ms(self) -> float | None: ...
    @property
    def gates(self) -> tuple[GateResult, ...]: ...
    @property
    def passed(self) -> bool: ...
    @property
    def error(self) -> str | None: ...


@dataclass(frozen=True)
class Decision:
    chosen: str | None
    reasons: tuple[str, ...]


def _floor(gate: str, value: float | None, limit: float | None, what: str | None = None) -> list[GateResult]:
    if limit is None or value is None:
        return []
    return [GateResult(gate, value >= limit, value, limit, what)]


def _ceiling(gate: str, value: float | None, limit: float | None, what: str | None = None) -> list[GateResult]:
    if limit is None or value is None:
        return []
    return [GateResult(gate, value <= limit, value, limit, what)]


def speedup(baseline_p95_ms: float, p95_ms: float) -> float:
    """p95(fp32) / p95(candidate); > 1 means the candidate is faster."""
    return baseline_p95_ms / p95_ms if p95_ms > 0 else float("inf")


def evaluate(precision: str, m: Metrics, baseline: Metrics, gates: Gates) -> tuple[GateResult, ...]:
    """Every configured gate for one candidate; FP32 is its own baseline."""
    score = None if m.score == "accuracy" else m.score
    drop = None if m.accuracy is None or baseline.accuracy is None else round(baseline.accuracy - m.accuracy, 12)
    results = [
        *_floor("min_accuracy", m.accuracy, gates.min_accuracy, score),
        *_ceiling("max_accuracy_drop", drop, gates.max_accuracy_drop, score),
        *_floor("min_agreement", m.agreement, gates.min_agreement),
        *_ceiling("max_size_bytes", m.size_bytes, gates.max_size_bytes),
        *_ceiling("max_p95_latency_ms", m.p95_ms, gates.max_p95_latency_ms),
    ]
    for output, fig in m.fidelity.items():
        limits = gates.fidelity_for(output)
        results += [*_floor("min_cosine", fig.get("cosine"), limits.get("min_cosine"), output),
                    *_floor("min_snr_db", fig.get("snr_db"), limits.get("min_snr_db"), output),
                    *_ceiling("max_abs_diff", fig.get("max_abs_diff"), limits.get("max_abs_diff"), output)]
    if precision != "fp32":
        results += _floor("min_speedup", speedup(baseline.p95_ms, m.p95_ms), gates.min_speedup)
    if precision == "int8":
        results += _floor("min_int8_speedup", speedup(baseline.p95_ms, m.p95_ms), gates.min_int8_speedup)
    return tuple(results)


_WORDING = {
    "min_accuracy": ("accuracy {v:.4f} < {l:.4f}", "accuracy"),
    "max_accuracy_drop": ("accuracy drop {v:.4f} > {l:.4f}", "drop"),
    "min_agreement": ("agreement with FP32 {v:.4f} < {l:.4f}", "agreement"),
    "max_size_bytes": ("size {v:,.0f} B > {l:,.0f} B", "size"),
    "max_p95_latency_ms": ("p95 latency {v:.3f} ms > {l:.3f} ms", "latency"),
    "min_int8_speedup": ("speed-up over FP32 {v:.2f}x < {l:.2f}x", "speed-up"),
    "min_speedup": ("speed-up over FP32 {v:.2f}x < {l:.2f}x", "speed-up"),
    "min_cosine": ("{w}: cosine to FP32 {v:.4f} < {l:.4f}", "cosine"),
    "min_snr_db": ("{w}: SNR {v:.1f} dB < {l:.1f} dB", "snr"),
    "max_abs_diff": ("{w}: max |diff| to FP32 {v:.3g} > {l:.3g}", "diff"),
    "golden_tolerance": ("outputs differ from the build host's by {v:.3g} > the golden tolerance {l:.3g}",
                         "golden"),
}


def golden(max_abs_diff: float, tolerance: float) -> GateResult:
    """The device replays the host's outputs within the tolerance: the class's runtime must too (where
    the golden set is the host's; a class of another ISA replays its own ISA's: builder.model.pipeline)."""
    return GateResult("golden_tolerance", max_abs_diff <= tolerance, max_abs_diff, tolerance)


def describe(result: GateResult) -> str:
    """A failed gate in words, e.g. "accuracy drop 0.2306 > 0.0100 (max_accuracy_drop)"."""
    template = _WORDING.get(result.gate, ("{v} vs {l}", ""))[0]
    if result.value is None or result.limit is None:
        return result.gate
    if result.what and result.gate in ("min_accuracy", "max_accuracy_drop"):
        template = template.replace("accuracy", result.what)
    return f"{template.format(v=result.value, l=result.limit, w=result.what)} ({result.gate})"


def failures(c: Verdict) -> str:
    if c.error:
        return c.error
    return "; ".join(describe(g) for g in c.gates if not g.passed)


def decide(candidates: Sequence[Verdict], pinned: str | None = None) -> Decision:
    """Pick the smallest candidate passing every gate (or the pinned one)."""
    refused = tuple(f"{c.name} refused: {failures(c)}" for c in candidates if not c.passed)
    if pinned is not None:
        return _decide_pinned(candidates, pinned, refused)
    passing = [c for c in candidates if c.passed]
    if not passing:
        return Decision(None, (*refused, "no candidate passed every gate"))
    best = min(passing, key=lambda c: (c.size_bytes or 0, c.p95_ms or 0.0))
    why = f"chose {best.name}: smallest candidate passing every gate ({best.size_bytes:,} bytes)"
    return Decision(best.name, (why, *refused))


def _decide_pinned(candidates: Sequence[Verdict], pinned: str, refused: tuple[str, ...]) -> Decision:
    match = [c for c in candidates if c.name == pinned]
    if not match:
        return Decision(None, (f"pinned candidate {pinned} was not built",))
    if match[0].passed:
        return Decision(pinned, (f"chose {pinned}: pinned by precision and it passed every gate", *refused))
    return Decision(None, (f"pinned candidate {pinned} failed: {failures(match[0])}",))
