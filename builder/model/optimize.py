"""Build candidate model files with onnxruntime: graph optimization, INT8, FP16.

Guards for onnxruntime 1.32 traps (see models/README or docs):
1. extra option CalibMaxIntermediateOutputs silently drops calibration
   batches: it is refused, and the reader must hand over every sample;
2. per-channel QDQ from an opset < 13 model writes a file that only fails when
   loaded: the quantization source is upgraded to opset 13 first (and the
   validator loads every candidate before measuring it);
3. quantizing a graph-optimized (fused Gemm/FusedMatMul) model fails: INT8 is
   always quantized from the pre-processed source, never from the optimized
   FP32 file; per-channel falls back to per-tensor with the reason recorded;
4. quant_pre_process leaves temp files in the working directory: it (and the
   quantizers) run with a throwaway working directory.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter
from onnxruntime import quantization as oq

from builder.core.errors import ModelError
from builder.model.data import Dataset, Signature, batched, default_opset, head, load_onnx

MIN_QDQ_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13
SENSITIVITY_SAMPLES = 64  # calibration samples the per-node analysis runs (one at a time: memory does not grow)
CALIBRATION_BATCH = 32
FORBIDDEN_EXTRA_OPTIONS = {
    "CalibMaxIntermediateOutputs": "silently drops calibration batches in onnxruntime 1.32",
}
FUSED_OPS = {"FusedGemm", "FusedMatMul", "FusedConv", "QLinearMatMul", "QLinearConv"}
GRAPH_LEVEL = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CALIBRATION = {
    "minmax": oq.CalibrationMethod.MinMax,
    "entropy": oq.CalibrationMethod.Entropy,
    "percentile": oq.CalibrationMethod.Percentile,
}


@contextlib.contextmanager
def scratch_cwd() -> Iterator[Path]:
    """Run the body in a fresh temporary working directory, removed afterwards.

    os.chdir is process-wide: fine for the CLI, not for threads.
    """
    old = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="kiln-model-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# -- graph optimization (the FP32 candidate) ----------------------------------

def graph_optimize(src: Path, dst: Path, level: str, provider: str) -> None:
    """Save the model as onnxruntime optimizes it at `level` ("none": a copy)."""
    if level == "none":
        shutil.copyfile(src, dst)
        return
    opts = ort.SessionOptions()
    opts.graph_optimization_level = GRAPH_LEVEL[level]
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), opts, providers=[provider])
    except Exception as exc:
        raise ModelError(f"{src}: onnxruntime cannot load the model: {_short(exc)}") from None


# -- the quantization source ---------------------------------------------------

def upgrade_opset(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Return the model at opset >= 13 (trap 2), noting the upgrade."""
    opset = default_opset(model)
    if opset >= MIN_QDQ_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, MIN_QDQ_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        raise ModelError(
            f"opset {opset} model cannot be upgraded to opset {MIN_QDQ_OPSET} for QDQ "
            f"quantization: {_short(exc)}",
            hint=f"re-export the model with opset >= {MIN_QDQ_OPSET}",
        ) from None
    notes.append(f"opset upgraded {opset} -> {MIN_QDQ_OPSET} before quantization "
                 "(per-channel QDQ at opset < 13 gives files that fail to load)")
    return upgraded


def quantization_source(model: onnx.ModelProto, work: Path, notes: list[str]) -> Path:
    """Opset-upgraded, pre-processed (shape inference, basic fusions) FP32 model."""
    upgraded = work / "upgraded.onnx"
    onnx.save(upgrade_opset(model, notes), str(upgraded))
    pre = work / "preprocessed.onnx"
    try:
        with scratch_cwd():
            oq.shape_inference.quant_pre_process(str(upgraded), str(pre), skip_symbolic_shape=True)
        load_onnx(pre)
    except Exception as exc:
        notes.append(f"quantization pre-processing failed ({_short(exc)}); quantizing without it")
        return _named(upgraded)
    return _named(pre)


def _named(path: Path) -> Path:
    """Give every unnamed node a unique name: int8-mixed keeps nodes in FP32 by name, and an
    empty name would match every unnamed node."""
    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            changed = True
    if changed:
        onnx.save(model, str(path))
    return path


def check_not_fused(path: Path) -> None:
    """Refuse a graph-optimized source: quantizing fused nodes fails (trap 3)."""
    fused = sorted({n.op_type for n in load_onnx(path).graph.node} & FUSED_OPS)
    if fused:
        raise ModelError(
            f"{path}: cannot quantize a graph-optimized model (it has {', '.join(fused)} nodes)",
            hint="quantize from the un-fused model as exported, not an onnxruntime-optimized one",
        )


# -- static INT8 ------------------------------------------------------------------

class CountingReader(oq.CalibrationDataReader):
    """Feeds calibration samples (the array form in batches) and counts how many were handed over."""

    def __init__(self, sig: Signature, data: Dataset, batch: int = CALIBRATION_BATCH) -> None:
        self.sig = sig
        self.data = data
        self.batch = batch
        self.feeds = iter(batched(sig, data, batch))
        self.consumed = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.feeds, None)
        if item is None:
            return None
        feed, n = item
        self.consumed += n
        if self.data.x is not None and self.sig.batch is not None and n < self.sig.batch:
            # a fixed-batch model: fill the short batch by repeating real samples
            return {k: _pad(v[:n], self.sig.batch) for k, v in feed.items()}
        return feed

    def rewind(self) -> None:
        self.feeds = iter(batched(self.sig, self.data, self.batch))
        self.consumed = 0


def _pad(chunk: np.ndarray, size: int) -> np.ndarray:
    """Fill a short batch for a fixed-batch model by repeating real samples."""
    if len(chunk) == size:
        return chunk
    reps = -(-size // len(chunk))
    return np.concatenate([chunk] * reps)[:size]


def _calibration_options(extra: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(extra or {})
    for key, why in FORBIDDEN_EXTRA_OPTIONS.items():
        if key in options:
            raise ModelError(f"quantization option {key} is refused: it {why}")
    return options


def quantize_static(src: Path, dst: Path, calib: Dataset, sig: Signature, *, per_channel: bool,
                    method: str, notes: list[str], extra_options: dict[str, Any] | None = None,
                    exclude: Sequence[str] = ()) -> None:
    """Static INT8 QDQ with calibration; per-channel falls back to per-tensor.

    `exclude`: node names left in FP32 (the mixed-precision candidate)."""
    check_not_fused(src)
    options = _calibration_options(extra_options)
    try:
        _quantize_static_once(src, dst, calib, sig, per_channel, method, options, exclude)
    except ModelError:
        raise
    except Exception as exc:
        if not per_channel:
            raise ModelError(f"static INT8 quantization failed: {_short(exc)}") from None
        notes.append(f"per-channel quantization failed ({_short(exc)}); fell back to per-tensor")
        quantize_static(src, dst, calib, sig, per_channel=False, method=method, notes=notes,
                        extra_options=options, exclude=exclude)


def _quantize_static_once(src: Path, dst: Path, calib: Dataset, sig: Signature, per_channel: bool,
                          method: str, options: dict[str, Any], exclude: Sequence[str] = ()) -> None:
    reader = CountingReader(sig, calib)
    with scratch_cwd():
        oq.quantize_static(
            str(src), str(dst), reader, quant_format=oq.QuantFormat.QDQ, per_channel=per_channel,
            activation_type=oq.QuantType.QInt8, weight_type=oq.QuantType.QInt8,
            # 7-bit weights: x86 CPUs without VNNI (AVX2, most edge x86 and QEMU guests) run
            # INT8 through VPMADDUBSW, whose int16 pair sums saturate with 8-bit weights and
            # give wrong outputs there while the build machine (VNNI) looks fine.
            reduce_range=True,
            calibrate_method=CALIBRATION[method], extra_options=options,
            nodes_to_exclude=list(exclude) or None,
        )
    if reader.consumed != len(calib):
        raise ModelError(f"calibration used {reader.consumed} of {len(calib)} samples")


# -- mixed precision: per-node error analysis ------------------------------------------------------

def sensitivity(source: Path, int8: Path, calib: Dataset, sig: Signature) -> list[tuple[str, float]]:
    """Nodes of `source` ranked by the quantization error they introduce, worst first.

    The FP32 source and its INT8 QDQ model, each made to output every activation (onnxruntime's QDQ
    debugging tools), run over the calibration samples one at a time, and every activation is compared
    (SQNR in dB, FP32 against QDQ, summed over the samples: what `qdq_loss_debug` computes over all of them
    at once, without holding them: memory is one sample's activations of both models, issue 36). A node's
    own share is how far the SQNR of its output falls below the worst SQNR of its inputs: error that starts
    there rather than error it inherits. Returns (node name, dB lost)."""
    from onnxruntime.quantization import qdq_loss_debug as qd

    calib = head(calib, SENSITIVITY_SAMPLES)
    with scratch_cwd() as work:
        try:
            qd.modify_model_output_intermediate_tensors(str(int8), str(work / "qdq.onnx"))
            qd.modify_model_output_intermediate_tensors(str(source), str(work / "fp32.onnx"))
            sqnr = streamed_sqnr(work / "qdq.onnx", work / "fp32.onnx", CountingReader(sig, calib, batch=1))
        except Exception as exc:
            raise ModelError(f"per-node error analysis failed: {_short(exc)}") from None
    quantized = quantized_nodes(int8)
    lost = []
    for node in load_onnx(source).graph.node:
        outs = [sqnr[o] for o in node.output if o in sqnr]
        if not outs or not node.name or node.name not in quantized:
            continue  # a node the quantizer left in FP32 anyway: keeping it in FP32 changes nothing
        ins = [sqnr[i] for i in node.input if i in sqnr]
        inherited = min(ins) if ins else math.inf
        own = min(outs)
        drop = (inherited - own) if math.isfinite(inherited) else (60.0 - own)
        if math.isfinite(drop) and drop > 0:
            lost.append((node.name, round(drop, 3)))
    return sorted(lost, key=lambda item: (-item[1], item[0]))


SAVED = "_ReshapedSavedOutput"  # qdq_loss_debug's suffix on the outputs it adds for every activation


def streamed_sqnr(qdq: Path, fp32: Path, reader: CountingReader, parts: int = 2) -> dict[str, float]:
    """Per activation, 20 log10(|FP32| / |FP32 - QDQ|) over every sample, as qdq_loss_debug's
    compute_activation_error gives its xmodel_err, from sums of squares kept per sample. Each sample runs
    PARTS times per model, each run asking for a PARTS-th of the activations: memory is that share of one
    sample's activations of both models (the detector at 640x480: about 1 GB in two parts)."""
    from onnxruntime.quantization import qdq_loss_debug as qd
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False  # an arena keeps its high-water mark: every activation of one sample
    sessions = [ort.InferenceSession(str(m), sess_options=options, providers=["CPUExecutionProvider"])
                for m in (qdq, fp32)]
    saved = [[o.name for o in s.get_outputs() if o.name.endswith(SAVED)] for s in sessions]

    def base(name: str) -> str:
        name = name.removesuffix(SAVED)
        for suffix in (DEQUANT_OUTPUT_SUFFIX + "_1", DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX):
            name = name.removesuffix(suffix)
        return name

    bases = sorted({base(n) for n in saved[1]})  # the FP32 model's activations: what is compared
    groups = [set(bases[i::parts]) for i in range(max(1, parts))]
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    while (feed := reader.get_next()) is not None:
        for group in groups:
            outputs = [[n for n in names if base(n) in group] for names in saved]
            got = [{n.removesuffix(SAVED): [v] for n, v in zip(names, s.run(names, feed), strict=True)} if names
                   else {} for s, names in zip(sessions, outputs, strict=True)]
            for name, match in qd.create_activation_matching(got[0], got[1]).items():
                if not match.get("float"):
                    continue
                x = np.asarray(match["float"][0], np.float64).ravel()
                d = x - np.asarray(match["post_qdq"][0], np.float64).ravel()
                signal[name] = signal.get(name, 0.0) + float(x @ x)
                noise[name] = noise.get(name, 0.0) + float(d @ d)
            del got  # this share of the sample's activations goes before the next one comes
    if reader.consumed == 0:
        raise ModelError("the per-node error analysis ran on no calibration sample")
    eps = float(np.finfo(float).eps)
    return {n: 20 * math.log10(max(math.sqrt(signal[n]), eps) / max(math.sqrt(noise[n]), eps)) for n in signal}


def quantized_nodes(int8: Path) -> set[str]:
    """The nodes a QDQ model runs quantized (the quantizer keeps the source's names): an operator the quantizer
    quantizes (onnxruntime's QDQ and QLinear registries), fed through a DequantizeLinear, its float weights too,
    and its output quantized again. A node outside this set runs in FP32 whatever nodes_to_exclude says: keeping
    it in FP32 changes no byte (issue 36: Div, ReduceMean and Erf, ranked and "kept", never were quantized)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    graph = load_onnx(int8).graph
    kinds = set(QDQRegistry) | set(QLinearOpsRegistry)
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    requantized = {i for n in graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    floats = {i.name for i in graph.initializer if i.data_type in (1, 10, 11, 16)}  # FLOAT, FLOAT16, DOUBLE, BF16
    return {n.name for n in graph.node if n.name and n.op_type in kinds
            and any(i in dequantized for i in n.input) and not any(i in floats for i in n.input)
            and any(o in requantized for o in n.output)}


# -- dynamic INT8, FP16 ------------------------------------------------------------

def quantize_dynamic(src: Path, dst: Path, *, per_channel: bool, notes: list[str]) -> None:
    """Weights-only INT8 (activations quantized at run time)."""
    check_not_fused(src)
    try:
        with scratch_cwd():
            oq.quantize_dynamic(str(src), str(dst), per_channel=per_channel,
                                weight_type=oq.QuantType.QInt8)
    except Exception as exc:
        if not per_channel:
            raise ModelError(f"dynamic INT8 quantization failed: {_short(exc)}") from None
        notes.append(f"per-channel dynamic quantization failed ({_short(exc)}); fell back to per-tensor")
        quantize_dynamic(src, dst, per_channel=False, notes=notes)


def to_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and compute, FP32 inputs and outputs kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(half, str(dst))
    except Exception as exc:
        raise ModelError(f"FP16 conversion failed: {_short(exc)}") from None
