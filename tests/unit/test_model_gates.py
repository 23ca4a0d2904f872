"""Gate logic, pure: tables of measured figures -> gate results -> decision."""

from __future__ import annotations

import pytest

from builder.core.errors import UsageError
from builder.model.gates import Metrics, decide, describe, evaluate, speedup
from builder.model.policy import Gates, OptimizationPolicy
from builder.model.report import CandidateResult

PRECISION = {"fp32": "fp32", "int8-static": "int8", "int8-dynamic": "int8", "fp16": "fp16"}
FP32 = Metrics(accuracy=0.986, agreement=1.0, size_bytes=40_000, p95_ms=0.60)


def candidates(table: dict[str, Metrics], gates: Gates) -> list[CandidateResult]:
    """CandidateResults as the pipeline makes them, from a table of figures."""
    base = table["fp32"]
    out = []
    for name, m in table.items():
        results = evaluate(PRECISION[name], m, base, gates)
        out.append(CandidateResult(name=name, precision=PRECISION[name], size_bytes=m.size_bytes,
                                   accuracy=m.accuracy, agreement=m.agreement, p95_ms=m.p95_ms,
                                   gates=results, passed=all(g.passed for g in results)))
    return out


def choose(table: dict[str, Metrics], gates: Gates, pinned: str | None = None) -> str | None:
    return decide(candidates(table, gates), pinned).chosen


INT8_GOOD = Metrics(accuracy=0.986, agreement=1.0, size_bytes=18_000, p95_ms=0.40)  # 1.5x faster
INT8_SLOW = Metrics(accuracy=0.986, agreement=1.0, size_bytes=18_000, p95_ms=0.75)  # 0.8x
INT8_BLANK = Metrics(accuracy=0.755, agreement=0.76, size_bytes=18_000, p95_ms=0.40)  # blank calibration
DYN_SLOW = Metrics(accuracy=0.986, agreement=1.0, size_bytes=17_000, p95_ms=1.20)  # 0.5x
FP16 = Metrics(accuracy=0.986, agreement=1.0, size_bytes=22_000, p95_ms=0.70)


@pytest.mark.parametrize(
    ("table", "gates", "pinned", "expected"),
    [
        # INT8 pays: smaller and faster, accuracy kept.
        ({"fp32": FP32, "int8-static": INT8_GOOD}, Gates(), None, "int8-static"),
        # INT8 slower than FP32: the speed-up gate says no, FP32 ships.
        ({"fp32": FP32, "int8-static": INT8_SLOW}, Gates(), None, "fp32"),
        # ... unless size is all that matters.
        ({"fp32": FP32, "int8-static": INT8_SLOW}, Gates(min_int8_speedup=0.0), None, "int8-static"),
        # Blank calibration: the accuracy drop gate refuses it even when it is fast.
        ({"fp32": FP32, "int8-static": INT8_BLANK}, Gates(min_int8_speedup=0.0), None, "fp32"),
        # Dynamic INT8 on a conv net is slower: refused; the smallest passing wins.
        ({"fp32": FP32, "int8-static": INT8_GOOD, "int8-dynamic": DYN_SLOW}, Gates(), None, "int8-static"),
        # FP16 is not speed-gated: smaller than FP32, so chosen when INT8 fails.
        ({"fp32": FP32, "int8-static": INT8_SLOW, "fp16": FP16}, Gates(), None, "fp16"),
        # Size gate: FP32 too big, INT8 fits.
        ({"fp32": FP32, "int8-static": INT8_GOOD}, Gates(max_size_bytes=20_000), None, "int8-static"),
        # Size gate: nothing fits.
        ({"fp32": FP32, "int8-static": INT8_GOOD}, Gates(max_size_bytes=10_000), None, None),
        # Latency gate: FP32 too slow, INT8 fast enough.
        ({"fp32": FP32, "int8-static": INT8_GOOD}, Gates(max_p95_latency_ms=0.5), None, "int8-static"),
        # Absolute accuracy floor applies to FP32 too.
        ({"fp32": FP32, "int8-static": INT8_GOOD}, Gates(min_accuracy=0.99), None, None),
        # Agreement floor.
        ({"fp32": FP32, "int8-static": INT8_BLANK}, Gates(max_accuracy_drop=1.0, min_int8_speedup=0.0,
                                                          min_agreement=0.99), None, "fp32"),
        # Loose drop gate lets the blank-calibrated model through (which is why the default is tight).
        ({"fp32": FP32, "int8-static": INT8_BLANK}, Gates(max_accuracy_drop=0.5), None, "int8-static"),
        # Pinned: the pinned candidate must pass, FP32 passing does not help.
        ({"fp32": FP32, "int8-static": INT8_SLOW}, Gates(), "int8-static", None),
        ({"fp32": FP32, "int8-static": INT8_GOOD}, Gates(), "int8-static", "int8-static"),
        ({"fp32": FP32, "int8-static": INT8_GOOD}, Gates(), "fp32", "fp32"),
        ({"fp32": FP32}, Gates(), "int8-static", None),
    ],
)
def test_decision_table(table: dict[str, Metrics], gates: Gates, pinned: str | None,
                        expected: str | None) -> None:
    assert choose(table, gates, pinned) == expected


def test_fp32_only_is_chosen_when_it_passes() -> None:
    assert choose({"fp32": FP32}, Gates()) == "fp32"


def test_tie_on_size_goes_to_the_faster() -> None:
    same_size = Metrics(accuracy=0.986, agreement=1.0, size_bytes=18_000, p95_ms=0.30)
    assert choose({"fp32": FP32, "int8-dynamic": INT8_GOOD, "int8-static": same_size}, Gates()) == "int8-static"


def test_speedup_gate_only_on_int8() -> None:
    names = {g.gate for g in evaluate("fp16", FP16, FP32, Gates())}
    assert "min_int8_speedup" not in names
    assert "min_int8_speedup" in {g.gate for g in evaluate("int8", INT8_SLOW, FP32, Gates())}


def test_unset_gates_are_not_reported() -> None:
    names = [g.gate for g in evaluate("fp32", FP32, FP32, Gates())]
    assert names == ["max_accuracy_drop"]


def test_gate_values_and_limits_are_recorded() -> None:
    results = {g.gate: g for g in evaluate("int8", INT8_BLANK, FP32, Gates(max_size_bytes=20_000))}
    drop = results["max_accuracy_drop"]
    assert not drop.passed and drop.value == pytest.approx(0.231) and drop.limit == 0.01
    assert results["max_size_bytes"].passed and results["max_size_bytes"].value == 18_000
    assert results["min_int8_speedup"].value == pytest.approx(speedup(0.60, 0.40))


def test_drop_exactly_at_the_limit_passes() -> None:
    m = Metrics(accuracy=0.976, agreement=0.99, size_bytes=1, p95_ms=0.1)
    (drop,) = [g for g in evaluate("fp16", m, FP32, Gates()) if g.gate == "max_accuracy_drop"]
    assert drop.passed


def test_reasons_say_why_in_words() -> None:
    decision = decide(candidates({"fp32": FP32, "int8-static": INT8_SLOW}, Gates()))
    assert decision.reasons[0].startswith("chose fp32")
    assert "int8-static refused: speed-up over FP32 0.80x < 1.00x (min_int8_speedup)" in decision.reasons


def test_nothing_passes_says_so() -> None:
    decision = decide(candidates({"fp32": FP32}, Gates(max_size_bytes=10)))
    assert decision.chosen is None
    assert decision.reasons[-1] == "no candidate passed every gate"
    assert "size 40,000 B > 10 B (max_size_bytes)" in decision.reasons[0]


def test_a_candidate_that_failed_to_build_is_refused_with_its_error() -> None:
    broken = CandidateResult(name="int8-static", precision="int8", error="build failed: boom")
    decision = decide([*candidates({"fp32": FP32}, Gates()), broken])
    assert decision.chosen == "fp32"
    assert "int8-static refused: build failed: boom" in decision.reasons


def test_describe_unknown_gate() -> None:
    from builder.model.gates import GateResult

    assert describe(GateResult("custom", False, None, None)) == "custom"


# -- policy --------------------------------------------------------------------------

def test_policy_candidates_and_pinning() -> None:
    assert OptimizationPolicy().candidate_names() == ("fp32", "int8-static")
    assert OptimizationPolicy(precision="fp32").candidate_names() == ("fp32",)
    assert OptimizationPolicy(precision="int8").pinned() == "int8-static"
    dyn = OptimizationPolicy(precision="int8", candidates=("int8-dynamic", "fp16"))
    assert dyn.candidate_names() == ("fp32", "int8-dynamic")
    assert OptimizationPolicy(precision="fp16").pinned() == "fp16"
    assert OptimizationPolicy().pinned() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int4"}, "precision: 'int4' is not one of"),
        ({"graph_level": "max"}, "graph_level"),
        ({"candidates": ("int8-static", "bf16")}, "candidates: 'bf16'"),
        ({"candidates": ("fp16", "fp16")}, "duplicates"),
        ({"calibration_method": "kl"}, "calibration_method"),
        ({"metric": "f1"}, "metric"),
        ({"latency_runs": 0}, "latency_runs"),
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        OptimizationPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_accuracy_drop": 1.5}, {"max_accuracy_drop": -0.1}, {"min_accuracy": 99.0},
     {"max_size_bytes": 0}, {"min_int8_speedup": -1.0}],
)
def test_gates_reject_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        Gates(**kwargs)  # type: ignore[arg-type]


def test_min_speedup_gates_every_smaller_precision_not_fp32() -> None:
    gates = Gates(min_int8_speedup=0.1, min_speedup=1.1)
    assert choose({"fp32": FP32, "fp16": FP16}, gates) == "fp32"  # FP16 is smaller but slower
    failed = [g for g in evaluate("fp16", FP16, FP32, gates) if not g.passed]
    assert [g.gate for g in failed] == ["min_speedup"]
    assert "min_speedup" not in [g.gate for g in evaluate("fp32", FP32, FP32, gates)]
    assert choose({"fp32": FP32, "int8-static": INT8_GOOD}, gates) == "int8-static"


def test_fidelity_gates_per_output_with_a_default() -> None:
    gates = Gates(fidelity={"*": {"min_cosine": 0.99}, "boxes": {"min_cosine": 0.9, "max_abs_diff": 0.5}})
    m = Metrics(accuracy=None, agreement=None, size_bytes=1, p95_ms=0.5, score="f1",
                fidelity={"scores": {"cosine": 0.95, "snr_db": 20.0, "max_abs_diff": 0.1},
                          "boxes": {"cosine": 0.95, "snr_db": 20.0, "max_abs_diff": 0.7}})
    results = {(g.gate, g.what): g.passed for g in evaluate("int8", m, FP32, gates)}
    assert results[("min_cosine", "scores")] is False and results[("min_cosine", "boxes")] is True
    assert results[("max_abs_diff", "boxes")] is False
    failed = next(g for g in evaluate("int8", m, FP32, gates) if g.gate == "max_abs_diff")
    assert describe(failed) == "boxes: max |diff| to FP32 0.7 > 0.5 (max_abs_diff)"
    with pytest.raises(UsageError, match="unknown min_cos"):
        Gates(fidelity={"*": {"min_cos": 0.9}})
