"""Measure candidates on real inputs: outputs, metric, agreement, load time, latency.

Every session runs on one thread with the policy's execution provider and
graph optimization level, as the device would.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from builder.errors import ModelError
from builder.model.data import Signature
from builder.model.optimize import GRAPH_LEVEL

PREDICT_BATCH = 256
WARMUP_RUNS = 10
LOAD_REPEATS = 3


def check_provider(provider: str) -> None:
    available = ort.get_available_providers()
    if provider not in available:
        raise ModelError(
            f"execution provider {provider} is not available in this onnxruntime "
            f"{ort.__version__} (available: {', '.join(available)})",
            hint="validate on a build machine with that accelerator and runtime",
        )


def session_options(graph_level: str) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = GRAPH_LEVEL[graph_level]
    opts.log_severity_level = 3
    return opts


def open_session(path: Path, graph_level: str, provider: str) -> ort.InferenceSession:
    """Load a model file in onnxruntime; failure is a ModelError naming the file."""
    try:
        return ort.InferenceSession(str(path), session_options(graph_level), providers=[provider])
    except Exception as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        raise ModelError(f"{path.name} does not load in onnxruntime: {first}") from None


def load_ms(path: Path, graph_level: str, provider: str) -> float:
    """Median wall time of creating a session, in milliseconds."""
    times = []
    for _ in range(LOAD_REPEATS):
        start = time.perf_counter()
        open_session(path, graph_level, provider)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def predict(sess: ort.InferenceSession, sig: Signature, x: np.ndarray) -> np.ndarray:
    """Outputs for every sample, batched to the model's batch size."""
    size = sig.batch or PREDICT_BATCH
    outs = [_run_padded(sess, sig, x[i:i + size], size) for i in range(0, len(x), size)]
    return np.concatenate(outs)


def _run_padded(sess: ort.InferenceSession, sig: Signature, chunk: np.ndarray, size: int) -> np.ndarray:
    n = len(chunk)
    if sig.batch is not None and n < size:
        chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
    try:
        out = sess.run([sig.output_name], {sig.input_name: chunk})[0]
    except Exception as exc:
        raise ModelError(f"inference failed: {str(exc).splitlines()[0][:300]}") from None
    return np.asarray(out)[:n]


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, C] scores against [N] labels."""
    return float(np.mean(outputs.reshape(len(labels), -1).argmax(1) == labels))


def agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples with the same top-1 class as the reference (FP32)."""
    n = len(reference)
    return float(np.mean(outputs.reshape(n, -1).argmax(1) == reference.reshape(n, -1).argmax(1)))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"accuracy": accuracy}


def latencies(sessions: Mapping[str, ort.InferenceSession], sig: Signature, x: np.ndarray,
              runs: int) -> dict[str, tuple[float, float]]:
    """p50/p95 single-inference latency (ms) per session, timed round-robin.

    Interleaving the candidates spreads machine noise evenly, which keeps the
    speed-up ratio between them honest.
    """
    repeat = sig.batch or 1  # a fixed-batch model gets one sample repeated
    samples = [np.repeat(x[i % len(x)][None], repeat, axis=0) for i in range(runs)]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for i in range(WARMUP_RUNS + runs):
        for name, sess in sessions.items():
            sample = samples[i % runs]
            start = time.perf_counter()
            sess.run([sig.output_name], {sig.input_name: sample})
            if i >= WARMUP_RUNS:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _p50_p95(t) for name, t in times.items()}


def _p50_p95(times: list[float]) -> tuple[float, float]:
    p50, p95 = np.percentile(np.asarray(times), [50, 95])
    return float(p50), float(p95)


def write_golden(path: Path, sig: Signature, x: np.ndarray, outputs: np.ndarray,
                 labels: np.ndarray, tolerance: float) -> None:
    """The golden set the device health check replays."""
    np.savez(path, x=x, outputs=outputs.astype(np.float32), labels=labels,
             tolerance=np.float64(tolerance), input_name=np.str_(sig.input_name),
             output_name=np.str_(sig.output_name))
