"""The gate on a model with two inputs (float image of any size, int64 scale) and two outputs,
built here with onnx.helper: sample directories of varied sizes, calibration through the data
reader, fidelity per output, and the build's refusal to bake a model the device cannot serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builder.errors import ModelError
from builder.model import Gates, OptimizationPolicy, optimize_model
from builder.models import input_count

pytestmark = pytest.mark.integration


def two_in_two_out(path: Path) -> Path:
    rng = np.random.default_rng(7)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.normal(0, 0.3, 108).astype(np.float32).tolist())
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["map"], name="relu"),
        helper.make_node("ReduceMean", ["map"], ["mean"], axes=[2, 3], keepdims=0, name="pool"),
        helper.make_node("Cast", ["scale"], ["scale_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["mean", "scale_f"], ["pooled"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "two-in-two-out",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"]),
         helper.make_tensor_value_info("scale", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def samples(d: Path, sizes: list[tuple[int, int]], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir()
    entries = []
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 256, (1, 3, h, w), dtype=np.uint8)
        np.savez(d / f"s{i}.npz", image=image, scale=np.array([[i + 1]], np.int64))
        entries.append({"file": f"s{i}.npz"})
    (d / "dataset.json").write_text(json.dumps({"inputs": {"image": {"scale": 1 / 255}}, "samples": entries}))
    return d


def test_two_inputs_two_outputs_varied_sizes(tmp_path: Path) -> None:
    model = two_in_two_out(tmp_path / "m.onnx")
    cal = samples(tmp_path / "cal", [(16, 16), (24, 40), (32, 8)], seed=1)
    val = samples(tmp_path / "val", [(20, 20), (12, 36)], seed=2)
    policy = OptimizationPolicy(task="fidelity", candidates=("int8-static", "fp16"), latency_runs=10)
    report = optimize_model(model, cal, val, policy, Gates(fidelity={"*": {"min_cosine": 0.98}}), tmp_path / "out")
    assert report.task == "fidelity" and report.datasets["calibration_samples"] == 3
    for c in report.candidates:
        assert set(c.fidelity) == {"pooled", "map"}
        assert c.accuracy is None and c.metrics == {}
    int8 = report.candidate("int8-static")
    assert int8.error is None and 0.98 <= int8.fidelity["map"]["cosine"] < 1.0
    gated = {(g.gate, g.what) for g in int8.gates}
    assert {("min_cosine", "pooled"), ("min_cosine", "map")} <= gated
    assert report.chosen is not None
    # the device serves one-input models only: no golden set, and the build says why
    assert not (tmp_path / "out" / "golden.npz").exists() and input_count(model) == 2


def test_a_sample_without_one_of_the_inputs_is_refused(tmp_path: Path) -> None:
    model = two_in_two_out(tmp_path / "m.onnx")
    val = samples(tmp_path / "val", [(20, 20)], seed=2)
    np.savez(val / "s0.npz", image=np.zeros((1, 3, 20, 20), np.uint8))
    with pytest.raises(ModelError, match=r"s0\.npz: arrays \['image'\] do not match the model inputs "
                                         r"\['image', 'scale'\] \(missing \['scale'\]\)"):
        optimize_model(model, val, val, OptimizationPolicy(task="fidelity", candidates=()), Gates(), tmp_path / "o")
    np.savez(val / "s0.npz", image=np.zeros((1, 3, 20, 20), np.uint8), scale=np.ones((1, 1), np.float32))
    with pytest.raises(ModelError, match=r"input 'scale' is float32 but the model takes int64"):
        optimize_model(model, val, val, OptimizationPolicy(task="fidelity", candidates=()), Gates(), tmp_path / "o")
    with pytest.raises(ModelError, match=r"the x/y \.npz form feeds one float input"):
        np.savez(tmp_path / "xy.npz", x=np.zeros((2, 3, 4, 4), np.float32))
        optimize_model(model, tmp_path / "xy.npz", val, OptimizationPolicy(task="fidelity", candidates=()),
                       Gates(), tmp_path / "o")
