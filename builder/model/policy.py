"""What to try (OptimizationPolicy) and what a candidate must meet (Gates).

Plain frozen dataclasses: the spec loader builds them, nothing here knows
about specs. Bad values raise UsageError with the field name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from builder.core.errors import UsageError
from builder.spec.schema import GOLDEN_COUNT, GOLDEN_TOLERANCE, LATENCY_RUNS, MIXED_MAX_NODES

PRECISIONS = ("auto", "fp32", "fp16", "int8")
GRAPH_LEVELS = ("none", "basic", "extended", "all")
CANDIDATES = ("int8-static", "int8-dynamic", "int8-mixed", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
METRICS = ("accuracy",)
TASKS = ("classification", "detection", "text-recognition", "fidelity")
FIDELITY_KEYS = ("min_cosine", "min_snr_db", "max_abs_diff")

# The precision each candidate name produces ("fp32" is always built). int8-mixed is static INT8
# with the nodes that hurt most left in FP32.
CANDIDATE_PRECISION = {"fp32": "fp32", "int8-static": "int8", "int8-dynamic": "int8", "int8-mixed": "int8",
                       "fp16": "fp16"}


def _one_of(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{field}: {value!r} is not one of {', '.join(allowed)}")


def _at_least(field: str, value: float | None, floor: float) -> None:
    if value is not None and value < floor:
        raise UsageError(f"{field}: {value} must be >= {floor}")


@dataclass(frozen=True, kw_only=True)
class Gates:
    """Release gates; None means "not gated"."""

    min_accuracy: float | None = None
    max_accuracy_drop: float = 0.01
    min_agreement: float | None = None
    max_size_bytes: int | None = None
    max_p95_latency_ms: float | None = None
    min_int8_speedup: float = 1.0
    # Every candidate but FP32 (FP16, INT8, mixed): p95(FP32) / p95(candidate) at least this.
    min_speedup: float | None = None
    # Per output name ("*": every output): min_cosine, min_snr_db, max_abs_diff against FP32 on the
    # worst validation sample.
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "max_accuracy_drop", "min_agreement"):
            value = getattr(self, name)
            _at_least(name, value, 0.0)
            if value is not None and value > 1.0:
                raise UsageError(f"{name}: {value} is a fraction and must be <= 1 (0.01 = 1 point)")
        _at_least("max_size_bytes", self.max_size_bytes, 1)
        _at_least("max_p95_latency_ms", self.max_p95_latency_ms, 0.0)
        _at_least("min_int8_speedup", self.min_int8_speedup, 0.0)
        _at_least("min_speedup", self.min_speedup, 0.0)
        for output, limits in self.fidelity.items():
            unknown = sorted(set(limits) - set(FIDELITY_KEYS))
            if unknown:
                raise UsageError(f"fidelity.{output}: unknown {', '.join(unknown)} "
                                 f"(one of {', '.join(FIDELITY_KEYS)})")
            cosine = limits.get("min_cosine")
            if cosine is not None and not -1.0 <= cosine <= 1.0:
                raise UsageError(f"fidelity.{output}.min_cosine: {cosine} must be within -1..1")
            _at_least(f"fidelity.{output}.max_abs_diff", limits.get("max_abs_diff"), 0.0)

    def fidelity_for(self, output: str) -> dict[str, float]:
        """The fidelity limits of one output: its own over the "*" defaults."""
        return {**self.fidelity.get("*", {}), **self.fidelity.get(output, {})}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class OptimizationPolicy:
    """How to optimize; precision other than "auto" pins that candidate."""

    precision: str = "auto"
    graph_level: str = "extended"
    candidates: tuple[str, ...] = ("int8-static",)
    per_channel: bool = True
    calibration_method: str = "minmax"
    execution_provider: str = "CPUExecutionProvider"
    metric: str = "accuracy"
    task: str = "classification"
    # builder.model.tasks.Postprocess as a dict (how the task metric reads the output)
    postprocess: dict[str, Any] = field(default_factory=dict)
    golden_count: int = GOLDEN_COUNT
    golden_tolerance: float = GOLDEN_TOLERANCE
    latency_runs: int = LATENCY_RUNS
    # int8-mixed: how many nodes the per-node analysis may keep in FP32 (the search tries 0, 1, 2, 4, ...
    # up to this) and how many candidates it builds at most.
    mixed_max_nodes: int = MIXED_MAX_NODES
    # Bump when the optimizer makes different files from the same inputs (2: reduce_range, 3: golden
    # weights); a cached report from another recipe is not reused.
    recipe: int = 3

    def __post_init__(self) -> None:
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("graph_level", self.graph_level, GRAPH_LEVELS)
        _one_of("calibration_method", self.calibration_method, CALIBRATION_METHODS)
        _one_of("metric", self.metric, METRICS)
        _one_of("task", self.task, TASKS)
        for name in self.candidates:
            _one_of("candidates", name, CANDIDATES)
        if len(set(self.candidates)) != len(self.candidates):
            raise UsageError(f"candidates: duplicates in {list(self.candidates)}")
        _at_least("golden_count", self.golden_count, 1)
        _at_least("golden_tolerance", self.golden_tolerance, 0.0)
        _at_least("latency_runs", self.latency_runs, 1)
        _at_least("mixed_max_nodes", self.mixed_max_nodes, 1)

    def candidate_names(self) -> tuple[str, ...]:
        """Names to build, "fp32" first (it is the baseline for every gate)."""
        if self.precision == "fp32":
            return ("fp32",)
        if self.precision == "auto":
            return ("fp32", *self.candidates)
        return ("fp32", self._pin())

    def pinned(self) -> str | None:
        """The candidate a non-auto precision pins; None for auto."""
        return None if self.precision == "auto" else self._pin()

    def _pin(self) -> str:
        matching = [c for c in self.candidates if CANDIDATE_PRECISION[c] == self.precision]
        defaults = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-static"}
        return matching[0] if matching else defaults[self.precision]

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["candidates"] = list(self.candidates)
        data["postprocess"] = dict(self.postprocess)
        return data
