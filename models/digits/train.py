"""Train the example digits CNN and export it to ONNX (FP32, opset 17).

Data: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten
digits, pixel values 0..16, scaled here to [0, 1]); nothing is downloaded.

Fixed split (seed 0): 360 held-out validation images, never used for
training or calibration; the other 1,437 train the model, and 200 of those
form the calibration set used by static INT8 quantization.

Needs torch (an optional extra, not a Kiln runtime dependency):

    pip install torch==2.13.0
    python models/digits/train.py            # rewrites digits.onnx and data/*.npz
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
N_VALIDATION = 360
N_CALIBRATION = 200
OPSET = 17


def split() -> dict[str, np.ndarray]:
    """Return train/calibration/validation arrays, x as float32 [N,1,8,8]."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    val, train = order[:N_VALIDATION], order[N_VALIDATION:]
    calib = train[:N_CALIBRATION]
    return {
        "x_train": x[train], "y_train": y[train],
        "x_cal": x[calib],
        "x_val": x[val], "y_val": y[val],
    }


class DigitsNet(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool, two fully connected layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    net.eval()


def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def export(net: nn.Module, path: Path) -> None:
    # The TorchScript exporter needs no onnxscript; torch 2.13 flags it as legacy.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    torch.onnx.export(
        net, (torch.zeros(1, 1, 8, 8),), str(path),
        dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    data = split()
    net = DigitsNet()
    train(net, data["x_train"], data["y_train"], args.epochs)
    print(f"validation accuracy: {accuracy(net, data['x_val'], data['y_val']):.4f}")
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    export(net, args.out / "digits.onnx")
    np.savez_compressed(args.out / "data" / "calibration.npz", x=data["x_cal"])
    np.savez_compressed(args.out / "data" / "validation.npz", x=data["x_val"], y=data["y_val"])


if __name__ == "__main__":
    main()
