"""Measure candidates on real inputs: every output per sample, load time, latency.

The metrics over those outputs (task metrics, fidelity to FP32) are builder.model.tasks.

Every session runs on one thread with the policy's execution provider and
graph optimization level, as the device would.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from builder.core.errors import ModelError
from builder.model.data import Dataset, Signature, batched, single
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


Outputs = dict[str, list[np.ndarray]]  # output name -> one array per sample (with its batch dimension)


def predict(sess: ort.InferenceSession, sig: Signature, data: Dataset) -> Outputs:
    """Every output for every sample; the array form runs in batches of the model's batch size."""
    names = sig.output_names
    out: Outputs = {n: [] for n in names}
    for feed, n in batched(sig, data, PREDICT_BATCH):
        try:
            got = sess.run(names, feed)
        except Exception as exc:
            raise ModelError(f"inference failed: {str(exc).splitlines()[0][:300]}") from None
        for name, value in zip(names, got, strict=True):
            value = np.asarray(value)
            if data.x is None:
                out[name].append(value)
            else:
                out[name] += [value[i:i + 1] for i in range(n)]
    return out


def first(outputs: Outputs, sig: Signature) -> np.ndarray:
    """The first output of every sample as one array (the array form's [N, ...])."""
    return np.concatenate(outputs[sig.output_name])


def latencies(sessions: Mapping[str, ort.InferenceSession], sig: Signature, data: Dataset,
              runs: int) -> dict[str, tuple[float, float]]:
    """p50/p95 single-inference latency (ms) per session, timed round-robin.

    Interleaving the candidates spreads machine noise evenly, which keeps the
    speed-up ratio between them honest. The samples are cycled through in order,
    so models with inputs of varied size are timed over the dataset's sizes.
    """
    samples = [single(sig, data, i) for i in range(min(runs, len(data)))]
    names = sig.output_names
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for i in range(WARMUP_RUNS + runs):
        for name, sess in sessions.items():
            sample = samples[i % len(samples)]
            start = time.perf_counter()
            sess.run(names, sample)
            if i >= WARMUP_RUNS:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _p50_p95(t) for name, t in times.items()}


def _p50_p95(times: list[float]) -> tuple[float, float]:
    p50, p95 = np.percentile(np.asarray(times), [50, 95])
    return float(p50), float(p95)


def write_golden(path: Path, sig: Signature, x: np.ndarray, outputs: np.ndarray,
                 labels: np.ndarray, tolerance: float) -> None:
    """The golden set the device health check replays (one input, one output, one shape)."""
    np.savez(path, x=x, outputs=outputs.astype(np.float32), labels=labels,
             tolerance=np.float64(tolerance), input_name=np.str_(sig.input_name),
             output_name=np.str_(sig.output_name))


def write_golden_samples(path: Path, sig: Signature, feeds: list[dict[str, np.ndarray]],
                         outputs: list[np.ndarray], tolerance: float, argmax: bool) -> None:
    """Golden set format 2: one input and one output per sample, of any size each.

    Keys: format (2), count, input_name, output_name, tolerance, argmax (whether the device also
    requires the same top-1), labels (empty), and x.I / outputs.I for sample I."""
    arrays: dict[str, np.ndarray] = {}
    for i, (feed, out) in enumerate(zip(feeds, outputs, strict=True)):
        arrays[f"x.{i}"] = feed[sig.input_name]
        arrays[f"outputs.{i}"] = out.astype(np.float32)
    np.savez(path, format=np.int64(2), count=np.int64(len(feeds)), tolerance=np.float64(tolerance),
             input_name=np.str_(sig.input_name), output_name=np.str_(sig.output_name),
             argmax=np.bool_(argmax), labels=np.zeros(0, np.int64), **arrays)  # type: ignore[arg-type]
