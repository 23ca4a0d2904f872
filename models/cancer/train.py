"""Train the example tabular MLP (breast cancer) and write it as ONNX (FP32, opset 17).

Data: scikit-learn's bundled ``load_breast_cancer`` (569 real cases, 30
features, 2 classes: 0 malignant, 1 benign); nothing is downloaded.

Standardization is baked into the data, not the graph: every feature is
scaled with the training split's mean and std, which are stored in both
npz files (``mean``, ``std``) for the device-side preprocessor. (Inside the
graph a per-tensor quantized input would squash the small-valued features.)

Fixed split (seed 0): 114 held-out validation cases, never used for
training or calibration; the other 455 train the model, 100 of those form
the calibration set.

The graph is written with onnx.helper as explicit MatMul + Add + Relu
nodes (the un-fused form many exporters produce), so it exercises the
per-channel trap on fused MatMul+Add (Gemm/FusedMatMul after graph
optimization).

Needs torch (an optional extra):  pip install torch==2.13.0
    python models/cancer/train.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_breast_cancer
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
N_VALIDATION = 114
N_CALIBRATION = 100
OPSET = 17
HIDDEN = (32, 16)


def split() -> dict[str, np.ndarray]:
    """Return standardized train/calibration/validation arrays."""
    data = load_breast_cancer()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    val, train = order[:N_VALIDATION], order[N_VALIDATION:]
    mean, std = x[train].mean(0), x[train].std(0)
    xs = ((x - mean) / std).astype(np.float32)
    return {
        "x_train": xs[train], "y_train": y[train], "x_cal": xs[train[:N_CALIBRATION]],
        "x_val": xs[val], "y_val": y[val],
        "mean": mean.astype(np.float32), "std": std.astype(np.float32),
    }


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(30, HIDDEN[0]), nn.ReLU(),
        nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU(),
        nn.Linear(HIDDEN[1], 2),
    )


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()


def to_onnx(net: nn.Sequential) -> onnx.ModelProto:
    """Write the MLP as MatMul + Add (+ Relu) nodes with a dynamic batch."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    nodes, inits, prev = [], [], "input"
    for i, lin in enumerate(linears):
        w = lin.weight.detach().numpy().T.copy()
        b = lin.bias.detach().numpy().copy()
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        last = i == len(linears) - 1
        nodes.append(helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"mm{i}"], name=f"MatMul_{i}"))
        out = "logits" if last else f"add{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [out], name=f"Add_{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"Relu_{i}"))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes, "cancer_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 30])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="kiln-models-cancer")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    d = split()
    net = make_net()
    train(net, d["x_train"], d["y_train"], args.epochs)
    with torch.no_grad():
        acc = (net(torch.from_numpy(d["x_val"])).argmax(1).numpy() == d["y_val"]).mean()
    print(f"validation accuracy: {acc:.4f}")
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(net), args.out / "cancer.onnx")
    stats = {"mean": d["mean"], "std": d["std"]}
    np.savez_compressed(args.out / "data" / "calibration.npz", x=d["x_cal"], **stats)
    np.savez_compressed(args.out / "data" / "validation.npz", x=d["x_val"], y=d["y_val"], **stats)


if __name__ == "__main__":
    main()
