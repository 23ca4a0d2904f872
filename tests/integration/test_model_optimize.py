"""optimize_model with real onnxruntime on the committed models and data.

Covers the issue's gates (INT8 chosen or refused, blank calibration refused,
corrupt model, shape mismatch) and each onnxruntime 1.32 trap it names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime import quantization as oq

from builder.core.errors import GateFailed, ModelError
from builder.model import optimize as opt
from builder.model.data import load_dataset, load_onnx, signature
from builder.model.pipeline import optimize_model
from builder.model.policy import Gates, OptimizationPolicy
from builder.model.report import read_report
from builder.model.validate import open_session

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FAST = {"latency_runs": 30}


def paths(name: str) -> tuple[Path, Path, Path]:
    d = MODELS / name
    return d / f"{name}.onnx", d / "data" / "calibration.npz", d / "data" / "validation.npz"


def run(out: Path, name: str = "digits", *, model: Path | None = None, cal: Path | None = None,
        val: Path | None = None, gates: Gates | None = None, **policy: Any) -> Any:
    m, c, v = paths(name)
    return optimize_model(model or m, cal or c, val or v, OptimizationPolicy(**{**FAST, **policy}),
                          gates or Gates(), out)


def save_x(path: Path, x: np.ndarray, **more: np.ndarray) -> Path:
    np.savez(path, x=x, **more)
    return path


# -- INT8 chosen or refused -----------------------------------------------------------

def test_digits_int8_chosen_when_it_passes(tmp_path: Path) -> None:
    report = run(tmp_path, gates=Gates(min_int8_speedup=0.0))
    assert report.chosen == "int8-static"
    fp32, int8 = report.candidate("fp32"), report.candidate("int8-static")
    assert fp32.accuracy >= 0.97 and fp32.accuracy - int8.accuracy <= 0.01
    assert int8.agreement >= 0.98 and int8.size_bytes < fp32.size_bytes / 2
    assert all(x > 0 for x in (int8.load_ms, int8.p50_ms, int8.p95_ms))
    assert (tmp_path / "chosen.onnx").read_bytes() == (tmp_path / "digits-int8-static.onnx").read_bytes()
    assert read_report(tmp_path / "report.json") == report


def test_golden_set_holds_the_chosen_models_outputs(tmp_path: Path) -> None:
    run(tmp_path, gates=Gates(min_int8_speedup=0.0), golden_count=16)
    golden = np.load(tmp_path / "golden.npz")
    assert golden["x"].shape == (16, 1, 8, 8) and golden["outputs"].shape == (16, 10)
    assert str(golden["input_name"]) == "input"
    assert float(golden["tolerance"]) == 1e-3
    outputs = golden["outputs"]
    sess = ort.InferenceSession(str(tmp_path / "chosen.onnx"), providers=["CPUExecutionProvider"])
    again = sess.run(None, {"input": golden["x"]})[0]
    assert np.abs(again - outputs).max() <= 1e-3


def test_digits_int8_refused_when_it_does_not_pay(tmp_path: Path) -> None:
    report = run(tmp_path, gates=Gates(min_int8_speedup=50.0))
    assert report.chosen == "fp32"
    assert any("int8-static refused" in r and "min_int8_speedup" in r for r in report.reasons)


def test_nothing_passes_raises_gate_failed_after_writing_the_report(tmp_path: Path) -> None:
    (tmp_path / "chosen.onnx").write_bytes(b"stale from an earlier run")
    with pytest.raises(GateFailed, match="no candidate can ship") as err:
        run(tmp_path, gates=Gates(max_size_bytes=1000))
    assert err.value.exit_code == 5
    assert "max_size_bytes" in str(err.value)
    assert read_report(tmp_path / "report.json").chosen is None
    assert not (tmp_path / "chosen.onnx").exists() and not (tmp_path / "golden.npz").exists()


def test_pinned_fp32_builds_only_fp32(tmp_path: Path) -> None:
    report = run(tmp_path, precision="fp32")
    assert [c.name for c in report.candidates] == ["fp32"] and report.chosen == "fp32"


def test_fp16_and_all_graph_levels(tmp_path: Path) -> None:
    for level in ("none", "basic", "all"):
        report = run(tmp_path / level, "cancer", candidates=("fp16",), graph_level=level)
        assert report.candidate("fp16").error is None
        assert report.candidate("fp16").agreement >= 0.98


def shuffled_digits(tmp_path: Path) -> Path:
    """A "bad" model: the output rows of the last layer rotated, so every answer is wrong."""
    model = onnx.load(str(paths("digits")[0]))
    for init in model.graph.initializer:
        if init.name in ("head.3.weight", "head.3.bias"):
            arr = np.roll(onnx.numpy_helper.to_array(init), 1, axis=0)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(tmp_path / "shuffled.onnx"))
    return tmp_path / "shuffled.onnx"


def test_a_wrong_model_is_refused_by_the_accuracy_floor(tmp_path: Path) -> None:
    with pytest.raises(GateFailed, match=r"fp32 refused: accuracy 0\.\d+ < 0\.9000 \(min_accuracy\)"):
        run(tmp_path / "out", model=shuffled_digits(tmp_path), gates=Gates(min_accuracy=0.9))
    assert read_report(tmp_path / "out" / "report.json").candidate("fp32").accuracy < 0.2


# -- blank calibration ---------------------------------------------------------------------

def test_blank_calibration_is_refused_by_the_gate(tmp_path: Path) -> None:
    _, cal, _ = paths("digits")
    blank = save_x(tmp_path / "blank.npz", np.zeros_like(load_dataset(cal, labels=False).x))
    report = run(tmp_path / "auto", cal=blank, gates=Gates(min_int8_speedup=0.0))
    int8 = report.candidate("int8-static")
    assert not int8.passed and report.chosen == "fp32"
    (drop,) = [g for g in int8.gates if g.gate == "max_accuracy_drop"]
    assert drop.value > 0.05
    with pytest.raises(GateFailed, match="pinned candidate int8-static failed: accuracy drop"):
        run(tmp_path / "pinned", cal=blank, precision="int8", gates=Gates(min_int8_speedup=0.0))
    assert not (tmp_path / "pinned" / "chosen.onnx").exists()
    assert (tmp_path / "pinned" / "report.json").exists()


# -- unusable inputs -> ModelError ------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "tail-cut", "garbage", "empty"])
def test_corrupt_model_is_a_clear_model_error(tmp_path: Path, damage: str) -> None:
    good = paths("digits")[0].read_bytes()
    data = {"truncated": good[: len(good) // 2], "tail-cut": good[:-3], "garbage": os.urandom(4096),
            "empty": b""}[damage]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data)
    with pytest.raises(ModelError, match=r"bad\.onnx: not a valid ONNX model") as err:
        run(tmp_path / "out", model=bad)
    assert err.value.exit_code == 6
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    assert err.value.__suppress_context__


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found"):
        run(tmp_path, model=tmp_path / "nope.onnx")


def test_model_input_shape_must_match_the_data(tmp_path: Path) -> None:
    _, cal, val = paths("cancer")
    with pytest.raises(ModelError, match=r"samples have shape \[100, 30\] but model input 'input' expects"):
        run(tmp_path, cal=cal, val=val)
    wrong = onnx.load(str(paths("digits")[0]))  # a model that wants 16x16 images
    for dim in wrong.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 16
    onnx.save(wrong, str(tmp_path / "wide.onnx"))
    with pytest.raises(ModelError, match=r"expects \['N', 1, 16, 16\]"):
        run(tmp_path / "out", model=tmp_path / "wide.onnx")


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.full((10, 1, 8, 8), np.nan, np.float32), "NaN/inf"),
        (np.full((10, 1, 8, 8), np.inf, np.float32), "NaN/inf"),
        (np.zeros((10, 64), np.float32), r"samples have shape \[10, 64\]"),
        (np.zeros((10, 1, 8, 8), np.int64), "must be floating point"),
        (np.zeros((0, 1, 8, 8), np.float32), "N >= 1"),
    ],
)
def test_bad_calibration_data(tmp_path: Path, x: np.ndarray, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        run(tmp_path, cal=save_x(tmp_path / "cal.npz", x))


def test_bad_validation_data(tmp_path: Path) -> None:
    x = np.zeros((5, 1, 8, 8), np.float32)
    with pytest.raises(ModelError, match="needs labels"):
        run(tmp_path, val=save_x(tmp_path / "a.npz", x))
    with pytest.raises(ModelError, match=r"labels range 0\.\.12 but the model has 10 outputs"):
        run(tmp_path, val=save_x(tmp_path / "b.npz", x, y=np.array([0, 1, 2, 3, 12])))
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"not a readable \.npz"):
        run(tmp_path, val=tmp_path / "c.npz")


def test_a_model_onnxruntime_cannot_run_is_a_model_error(tmp_path: Path) -> None:
    model = onnx.load(str(paths("digits")[0]))
    model.graph.node[1].op_type, model.graph.node[1].domain = "NoSuchOp", "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, str(tmp_path / "odd.onnx"))
    with pytest.raises(ModelError, match=r"odd\.onnx: onnxruntime cannot load the model"):
        run(tmp_path / "out", model=tmp_path / "odd.onnx")


def test_unavailable_execution_provider(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="TensorrtExecutionProvider is not available"):
        run(tmp_path, execution_provider="TensorrtExecutionProvider")


# -- trap 1: CalibMaxIntermediateOutputs drops calibration batches ------------------------

def test_trap1_every_calibration_sample_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, seen = oq.quantize_static, []

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs)
        real(*args, **kwargs)
        seen.append({"consumed": args[2].consumed})

    monkeypatch.setattr(oq, "quantize_static", spy)
    run(tmp_path)
    assert "CalibMaxIntermediateOutputs" not in seen[0]["extra_options"]
    assert seen[1]["consumed"] == 200


def test_trap1_forbidden_option_and_short_reads_are_errors(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model, cal, _ = paths("digits")
    data, sig = load_dataset(cal, labels=False), signature(load_onnx(model), model)
    with pytest.raises(ModelError, match="CalibMaxIntermediateOutputs is refused"):
        opt.quantize_static(model, tmp_path / "q.onnx", data, sig, per_channel=True, method="minmax",
                            notes=[], extra_options={"CalibMaxIntermediateOutputs": 10})

    def reads_half(src: str, dst: str, reader: Any, **_kw: Any) -> None:
        for _ in range(3):
            reader.get_next()
        Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(oq, "quantize_static", reads_half)
    with pytest.raises(ModelError, match="calibration used 96 of 200 samples"):
        opt.quantize_static(model, tmp_path / "q.onnx", data, sig, per_channel=False, method="minmax",
                            notes=[])


# -- trap 2: opset 11 + per-channel gives files that only fail when loaded ------------------

def opset11(tmp_path: Path, name: str = "digits") -> Path:
    """The same graph declared at opset 11 (its ops mean the same there)."""
    model = onnx.load(str(paths(name)[0]))
    model.opset_import[0].version = 11
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / f"{name}11.onnx"))
    return tmp_path / f"{name}11.onnx"


def test_trap2_opset11_is_upgraded_before_per_channel(tmp_path: Path) -> None:
    report = run(tmp_path / "out", model=opset11(tmp_path), gates=Gates(min_int8_speedup=0.0))
    int8 = report.candidate("int8-static")
    assert int8.error is None and int8.passed and report.chosen == "int8-static"
    assert any("opset upgraded 11 -> 13" in n for n in int8.notes)
    assert onnx.load(str(tmp_path / "out" / int8.path)).opset_import[0].version >= 13


def test_trap2_every_candidate_is_loaded_before_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opt, "upgrade_opset", lambda model, notes: model)  # disable the upgrade
    report = run(tmp_path / "out", model=opset11(tmp_path), gates=Gates(min_int8_speedup=0.0))
    int8 = report.candidate("int8-static")
    assert int8.error is not None and "does not load in onnxruntime" in int8.error
    assert report.chosen == "fp32"
    with pytest.raises(ModelError, match="does not load"):
        open_session(tmp_path / "out" / "digits11-int8-static.onnx", "basic", "CPUExecutionProvider")


# -- trap 3: per-channel on fused MatMul+Add ---------------------------------------------

def test_trap3_cancer_mlp_quantized_from_the_unfused_model(tmp_path: Path) -> None:
    assert {n.op_type for n in load_onnx(paths("cancer")[0]).graph.node} == {"MatMul", "Add", "Relu"}
    report = run(tmp_path, "cancer", graph_level="all", per_channel=True, gates=Gates(min_int8_speedup=0.0))
    fp32_ops = {n.op_type for n in onnx.load(str(tmp_path / "cancer-fp32.onnx")).graph.node}
    assert fp32_ops & opt.FUSED_OPS  # the FP32 candidate is fused ...
    int8 = report.candidate("int8-static")
    assert int8.error is None and int8.passed  # ... yet per-channel INT8 works
    assert int8.accuracy >= 0.95


def test_trap3_a_fused_input_model_is_refused_for_int8_not_crashed(tmp_path: Path) -> None:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(paths("cancer")[0]), opts, providers=["CPUExecutionProvider"])
    report = run(tmp_path / "out", "cancer", model=tmp_path / "fused.onnx", gates=Gates(min_int8_speedup=0.0))
    assert "cannot quantize a graph-optimized model (it has FusedGemm" in (report.candidate("int8-static").error or "")
    assert report.chosen == "fp32"


def test_trap3_per_channel_failure_falls_back_to_per_tensor(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = oq.quantize_static

    def no_per_channel(*args: Any, **kwargs: Any) -> None:
        if kwargs["per_channel"]:
            raise ValueError("Unable to get valid quantization scale (simulated)")
        real(*args, **kwargs)

    monkeypatch.setattr(oq, "quantize_static", no_per_channel)
    int8 = run(tmp_path, "cancer", gates=Gates(min_int8_speedup=0.0)).candidate("int8-static")
    assert int8.passed
    assert any("per-channel quantization failed (Unable to get valid" in n and "per-tensor" in n
               for n in int8.notes)


# -- trap 4: pre-processing leaves temp files in the working directory -------------------------

def test_trap4_working_directory_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    real, where = oq.shape_inference.quant_pre_process, []

    def spy(*args: Any, **kwargs: Any) -> None:
        where.append(Path.cwd())
        (Path.cwd() / "leftover.tmp").write_bytes(b"x" * 1024)  # what the trap does
        real(*args, **kwargs)

    monkeypatch.setattr(oq.shape_inference, "quant_pre_process", spy)
    run(tmp_path / "out", candidates=("int8-static", "int8-dynamic"))
    assert where and where[0] != cwd
    assert Path.cwd() == cwd and list(cwd.iterdir()) == []
    assert not where[0].exists()


# -- trap 5: dynamic INT8 on a conv net is slower than FP32 ---------------------------------

def test_trap5_dynamic_int8_on_digits_is_not_chosen(tmp_path: Path) -> None:
    report = run(tmp_path, candidates=("int8-dynamic",), latency_runs=200, gates=Gates(min_int8_speedup=1.0))
    dyn = report.candidate("int8-dynamic")
    assert dyn.accuracy >= 0.97  # accurate, but ...
    assert dyn.speedup is not None and dyn.speedup < 1.0, f"measured speed-up {dyn.speedup:.2f}x"
    assert report.chosen == "fp32"
    assert any("int8-dynamic refused: speed-up over FP32" in r for r in report.reasons)
