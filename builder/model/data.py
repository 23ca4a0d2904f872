"""Load and check the inputs: the ONNX model and its calibration/validation data.

Everything unusable raises ModelError with the file name and what is wrong.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from builder.errors import ModelError

Dim = int | None  # None: a dynamic (symbolic or unknown) dimension


@dataclass(frozen=True)
class Signature:
    """The single float input and single output of a classifier model."""

    input_name: str
    input_shape: tuple[Dim, ...]
    output_name: str
    output_shape: tuple[Dim, ...]
    opset: int

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None when the batch dimension is dynamic."""
        return self.input_shape[0] if self.input_shape else None

    @property
    def classes(self) -> int | None:
        return self.output_shape[-1] if self.output_shape else None


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32, [N, *input_shape[1:]]
    y: np.ndarray | None  # int64 labels [N], validation only


def load_onnx(path: Path) -> onnx.ModelProto:
    """Parse and check an ONNX file; a corrupt or truncated one is a ModelError."""
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...
        raise ModelError(
            f"{path}: not a valid ONNX model (corrupt or truncated?): {_first_line(exc)}",
            hint="re-export the model, or check the file was copied completely",
        ) from None
    if not model.graph.node:
        raise ModelError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _dims(value_info: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def signature(model: onnx.ModelProto, path: Path) -> Signature:
    """Describe the model's one input and one output, or raise ModelError."""
    init_names = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"{path}: expected one input and one output, found "
            f"{len(inputs)} input(s) and {len(outputs)} output(s)"
        )
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"{path}: input {inputs[0].name!r} must be float32")
    return Signature(inputs[0].name, _dims(inputs[0]), outputs[0].name, _dims(outputs[0]),
                     default_opset(model))


def load_dataset(path: Path, *, labels: bool) -> Dataset:
    """Read an npz with `x` (and `y` when `labels`); check values are usable."""
    arrays = _read_npz(path)
    if "x" not in arrays:
        raise ModelError(f"{path}: no array named 'x' (found: {', '.join(arrays) or 'none'})")
    x = _check_x(path, arrays["x"])
    y = _check_y(path, arrays.get("y"), len(x)) if labels else None
    return Dataset(x, y)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ModelError(f"{path}: data file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"{path}: not a readable .npz file: {_first_line(exc)}") from None


def _check_x(path: Path, x: np.ndarray) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        raise ModelError(f"{path}: x must be floating point (scaled inputs), got {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise ModelError(f"{path}: x must be [N, ...] with N >= 1, got shape {list(x.shape)}")
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ModelError(f"{path}: x holds {bad} NaN/inf value(s)")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_y(path: Path, y: np.ndarray | None, n: int) -> np.ndarray:
    if y is None:
        raise ModelError(f"{path}: validation data needs labels in an array named 'y'")
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ModelError(f"{path}: y must be {n} integer labels, got {y.dtype} {list(y.shape)}")
    return y.astype(np.int64)


def check_fits(sig: Signature, data: Dataset, path: Path) -> None:
    """Refuse data whose sample shape or labels do not fit the model."""
    want = sig.input_shape[1:]
    got = data.x.shape[1:]
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
        shown = ["N", *("?" if w is None else w for w in want)]
        raise ModelError(
            f"{path}: samples have shape {list(data.x.shape)} but model input "
            f"{sig.input_name!r} expects {shown}"
        )
    if data.y is not None and sig.classes is not None:
        _check_labels(data.y, sig.classes, path)


def _check_labels(y: np.ndarray, classes: int, path: Path) -> None:
    if y.min() < 0 or y.max() >= classes:
        raise ModelError(
            f"{path}: labels range {int(y.min())}..{int(y.max())} but the model has {classes} outputs"
        )
