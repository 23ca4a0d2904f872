"""Load and check the inputs: the ONNX model and its calibration/validation data.

Two dataset forms, both declarative:

- an `.npz` with `x` [N, ...] (and integer labels `y` [N]): one float input, one sample per row;
- a directory with `dataset.json` and one `.npz` per sample, keyed by input name (each array with
  its batch dimension, so samples may differ in size). `dataset.json`:

      {"inputs": {"x": {"scale": 0.00784313725, "offset": -1.0}},   # optional, uint8 -> float
       "samples": [{"file": "page.npz", "truth": ...}, ...]}

  `truth` is the ground truth in the task's form (builder.model.tasks): a class index, a list of
  [x0, y0, x1, y1] boxes, or a text. A uint8 array for a float input is scaled as
  `value * scale + offset` (scale and offset: a number or one per channel, axis 1).

Everything unusable raises ModelError with the file name and what is wrong.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from builder.core.errors import ModelError

Dim = int | None  # None: a dynamic (symbolic or unknown) dimension
Feed = dict[str, np.ndarray]
MANIFEST = "dataset.json"
MAX_SAMPLES = 100_000

ELEM_DTYPES: dict[int, Any] = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Any  # a numpy scalar type; None: a type Kiln cannot feed
    shape: tuple[Dim, ...]

    @property
    def floating(self) -> bool:
        return self.dtype is not None and np.issubdtype(self.dtype, np.floating)

    def shown(self) -> list[object]:
        return ["N", *("?" if d is None else d for d in self.shape[1:])]


@dataclass(frozen=True)
class Signature:
    """The model's inputs and outputs (names, element types, shapes with dynamic dims as None)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def input_shape(self) -> tuple[Dim, ...]:
        return self.inputs[0].shape

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def output_shape(self) -> tuple[Dim, ...]:
        return self.outputs[0].shape

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None when the batch dimension is dynamic."""
        return self.input_shape[0] if self.input_shape else None

    @property
    def classes(self) -> int | None:
        return self.output_shape[-1] if self.output_shape else None

    def output(self, name: str | None) -> str:
        """An output by name (None: the first); ModelError naming the ones there are."""
        if name is None:
            return self.output_name
        if name not in self.output_names:
            raise ModelError(f"the model has no output {name!r} (outputs: {', '.join(self.output_names)})")
        return name


@dataclass(frozen=True)
class Dataset:
    """Samples as feeds (each tensor with its batch dimension) and their ground truth, if any.

    `x`/`y` are the stacked arrays of the single-input `.npz` form (None for a directory)."""

    path: Path
    samples: tuple[Feed, ...]
    truth: tuple[Any, ...] | None
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    names: tuple[str, ...] = ()  # each sample's file (directory form)

    def __len__(self) -> int:
        return len(self.samples)

    def where(self, i: int) -> str:
        return f"{self.path}/{self.names[i]}" if self.names else f"{self.path}: sample {i}"


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


def _tensor(v: onnx.ValueInfoProto) -> TensorSpec:
    return TensorSpec(v.name, ELEM_DTYPES.get(int(v.type.tensor_type.elem_type)), _dims(v))


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def signature(model: onnx.ModelProto, path: Path) -> Signature:
    """Describe the model's inputs and outputs, or raise ModelError for one Kiln cannot feed."""
    init_names = {i.name for i in model.graph.initializer}
    inputs = tuple(_tensor(i) for i in model.graph.input if i.name not in init_names)
    outputs = tuple(_tensor(o) for o in model.graph.output)
    if not inputs or not outputs:
        raise ModelError(f"{path}: the model has {len(inputs)} input(s) and {len(outputs)} output(s)")
    for t in inputs:
        if t.dtype is None or t.dtype is np.bool_:
            kind = onnx.TensorProto.DataType.Name(_elem(model, t.name))
            raise ModelError(f"{path}: input {t.name!r} has element type {kind}, which Kiln cannot feed "
                             "(float, int and uint8 inputs are supported)")
        if not t.shape:
            raise ModelError(f"{path}: input {t.name!r} is a scalar; inputs need a batch dimension")
    for t in outputs:
        if t.dtype is None or t.dtype is np.bool_:
            raise ModelError(f"{path}: output {t.name!r} is not a numeric tensor (a sequence, map or string "
                             "output, such as a ZipMap): Kiln compares numeric outputs only",
                             hint="export the model without the post-processing that makes it")
    return Signature(inputs, outputs, default_opset(model))


def _elem(model: onnx.ModelProto, name: str) -> int:
    return next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == name)


# -- datasets ------------------------------------------------------------------------------------

def load_dataset(path: Path, *, labels: bool) -> Dataset:
    """An `.npz` with `x` (and `y` when `labels`), or a directory of samples with dataset.json."""
    if path.is_dir() or path.name == MANIFEST:
        return load_samples(path if path.is_dir() else path.parent)
    arrays = _read_npz(path)
    if "x" not in arrays:
        raise ModelError(f"{path}: no array named 'x' (found: {', '.join(arrays) or 'none'})")
    x = _check_x(path, arrays["x"])
    y = _check_y(path, arrays.get("y"), len(x)) if labels else None
    samples = tuple({"x": x[i:i + 1]} for i in range(len(x)))
    truth = tuple(int(v) for v in y) if y is not None else None
    return Dataset(path, samples, truth, x, y)


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


def load_samples(directory: Path) -> Dataset:
    """The directory form: dataset.json plus one npz per sample."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ModelError(f"{directory}: a sample directory needs {MANIFEST} (see docs/models.md)")
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{manifest}: not valid JSON: {_first_line(exc)}") from None
    entries = doc.get("samples") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries or len(entries) > MAX_SAMPLES:
        raise ModelError(f"{manifest}: 'samples' must be a non-empty list of {{file, truth}}")
    scaling = _scaling(manifest, doc.get("inputs", {}))
    samples, truth, names = [], [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ModelError(f"{manifest}: samples[{i}] must be an object with a 'file'")
        name = entry["file"]
        if "/" in name or name.startswith(".") or not name.endswith(".npz"):
            raise ModelError(f"{manifest}: samples[{i}].file {name!r} must be an .npz file in {directory}")
        arrays = _read_npz(directory / name)
        if not arrays:
            raise ModelError(f"{directory / name}: holds no arrays")
        samples.append({k: _scaled(directory / name, k, v, scaling) for k, v in arrays.items()})
        truth.append(entry.get("truth"))
        names.append(name)
    has_truth = [t is not None for t in truth]
    if any(has_truth) and not all(has_truth):
        missing = names[has_truth.index(False)]
        raise ModelError(f"{manifest}: sample {missing} has no truth while others have (all or none)")
    return Dataset(directory, tuple(samples), tuple(truth) if all(has_truth) else None, names=tuple(names))


Scale = tuple[np.ndarray, np.ndarray]


def _scaling(manifest: Path, inputs: object) -> dict[str, Scale]:
    if not isinstance(inputs, dict):
        raise ModelError(f"{manifest}: 'inputs' must map input names to {{scale, offset}}")
    out = {}
    for name, s in inputs.items():
        if not isinstance(s, dict) or set(s) - {"scale", "offset"}:
            raise ModelError(f"{manifest}: inputs.{name} takes 'scale' and 'offset' only")
        try:
            scale = np.asarray(s.get("scale", 1.0), np.float64)
            offset = np.asarray(s.get("offset", 0.0), np.float64)
        except (TypeError, ValueError):
            raise ModelError(f"{manifest}: inputs.{name}: scale and offset must be numbers or lists") from None
        if scale.ndim > 1 or offset.ndim > 1 or not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset))):
            raise ModelError(f"{manifest}: inputs.{name}: scale and offset must be finite numbers or lists")
        out[name] = (scale, offset)
    return out


def _scaled(path: Path, name: str, value: np.ndarray, scaling: dict[str, Scale]) -> np.ndarray:
    if name not in scaling:
        return value
    if value.dtype != np.uint8:
        raise ModelError(f"{path}: input {name!r} is {value.dtype}; dataset.json scales uint8 samples only")
    scale, offset = scaling[name]
    if value.ndim < 2:
        raise ModelError(f"{path}: input {name!r} has shape {list(value.shape)}; it needs [N, C, ...]")
    shape = [1] * value.ndim
    for vec in (scale, offset):
        if vec.ndim == 1 and len(vec) != value.shape[1]:
            raise ModelError(f"{path}: input {name!r} has {value.shape[1]} channels (axis 1), "
                             f"dataset.json gives {len(vec)} scale/offset values")
    s = scale.reshape([-1 if i == 1 and scale.ndim else 1 for i in range(len(shape))]) if scale.ndim else scale
    o = offset.reshape([-1 if i == 1 and offset.ndim else 1 for i in range(len(shape))]) if offset.ndim else offset
    return (value.astype(np.float64) * s + o).astype(np.float32)


# -- fitting data to the model --------------------------------------------------------------------

def check_fits(sig: Signature, data: Dataset, path: Path) -> None:
    """Refuse data whose samples or labels do not fit the model; cast samples to its input types."""
    if data.x is not None and len(sig.inputs) == 1 and sig.inputs[0].floating:
        _check_array_form(sig, data, path)
        return
    if data.x is not None:
        raise ModelError(f"{path}: the x/y .npz form feeds one float input; the model has "
                         f"{', '.join(f'{t.name!r} ({np.dtype(t.dtype).name})' for t in sig.inputs)}: "
                         "use a sample directory (dataset.json)")
    for i, feed in enumerate(data.samples):
        _check_feed(sig, feed, data.where(i))


def _check_array_form(sig: Signature, data: Dataset, path: Path) -> None:
    assert data.x is not None
    want = sig.input_shape[1:]
    got = data.x.shape[1:]
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
        shown = ["N", *("?" if w is None else w for w in want)]
        raise ModelError(
            f"{path}: samples have shape {list(data.x.shape)} but model input "
            f"{sig.input_name!r} expects {shown}"
        )
    dtype = sig.inputs[0].dtype
    for feed in data.samples:
        feed[sig.input_name] = feed.pop("x").astype(dtype, copy=False)
    if data.y is not None and sig.classes is not None:
        _check_labels(data.y, sig.classes, path)


def _check_feed(sig: Signature, feed: Feed, where: str) -> None:
    names = {t.name for t in sig.inputs}
    extra, missing = sorted(set(feed) - names), sorted(names - set(feed))
    if extra or missing:
        raise ModelError(f"{where}: arrays {sorted(feed)} do not match the model inputs {sorted(names)}"
                         + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""))
    batch = None
    for t in sig.inputs:
        v = feed[t.name]
        if v.ndim != len(t.shape) or any(d is not None and d != s for d, s in zip(t.shape, v.shape, strict=True)):
            raise ModelError(f"{where}: input {t.name!r} has shape {list(v.shape)}, the model expects "
                             f"{['?' if d is None else d for d in t.shape]} (batch first)")
        if v.shape[0] == 0 or (batch is not None and v.shape[0] != batch):
            raise ModelError(f"{where}: every input needs the same batch size >= 1, got {list(v.shape)}")
        batch = v.shape[0]
        if t.floating and not np.issubdtype(v.dtype, np.floating):
            raise ModelError(f"{where}: input {t.name!r} is {v.dtype} but the model takes "
                             f"{np.dtype(t.dtype).name} (scale it in dataset.json 'inputs')")
        if not t.floating and not np.issubdtype(v.dtype, np.integer):
            raise ModelError(f"{where}: input {t.name!r} is {v.dtype} but the model takes {np.dtype(t.dtype).name}")
        if t.floating and not np.all(np.isfinite(v)):
            raise ModelError(f"{where}: input {t.name!r} holds NaN/inf values")
        feed[t.name] = np.ascontiguousarray(v, dtype=t.dtype)


def _check_labels(y: np.ndarray, classes: int, path: Path) -> None:
    if y.min() < 0 or y.max() >= classes:
        raise ModelError(
            f"{path}: labels range {int(y.min())}..{int(y.max())} but the model has {classes} outputs"
        )


def head(data: Dataset, count: int) -> Dataset:
    """The first `count` samples."""
    return replace(data, samples=data.samples[:count], x=None if data.x is None else data.x[:count],
                   y=None if data.y is None else data.y[:count],
                   truth=None if data.truth is None else data.truth[:count], names=data.names[:count])


def batched(sig: Signature, data: Dataset, size: int) -> Iterator[tuple[Feed, int]]:
    """(feed, real samples in it): the array form in batches (padded for a fixed batch), else per sample."""
    if data.x is None:
        for feed in data.samples:
            yield feed, 1
        return
    fixed = sig.batch
    step = fixed or size
    for i in range(0, len(data.x), step):
        chunk = data.x[i:i + step].astype(sig.inputs[0].dtype, copy=False)
        n = len(chunk)
        if fixed is not None and n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
        yield {sig.input_name: chunk}, n


def single(sig: Signature, data: Dataset, i: int) -> Feed:
    """Sample i as one inference (the array form: one row, repeated to a fixed batch)."""
    feed = data.samples[i % len(data)]
    if data.x is None or not sig.batch:
        return feed
    return {k: np.repeat(v, sig.batch, axis=0) for k, v in feed.items()}


def stack(outputs: Sequence[np.ndarray]) -> np.ndarray | None:
    """Per-sample outputs as one array when they all have one shape (else None)."""
    shapes = {o.shape for o in outputs}
    return np.concatenate(list(outputs)) if len(shapes) == 1 else None
