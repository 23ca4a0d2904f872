"""Measure model candidates under another onnxruntime build (the class's runtime), in its own venv.

    <venv>/bin/python -I builder/model/runtime_worker.py REQUEST.json

Runs with the standard library, numpy and that venv's onnxruntime only: it imports nothing
from builder (the venv does not have it). The gate (builder.model.runtimes) writes the request
and reads back what this writes:

    request:  {"candidates": [{"name", "precision", "path"}], "inputs": NPZ with "I:NAME" per feed I
               and input NAME, "feeds", "rows" (samples in each feed), "input_names", "output_names",
               "array_form" (feeds are batches of rows: outputs are split per row), "batch" (a fixed
               batch size or null), "latency_samples", "graph_level", "latency_runs", "warmup_runs",
               "attempts": {precision: [[provider or [provider, {options}], ...], ...]},
               "result", "outputs", "golden" (optional: {"inputs", "feeds", "rows", "outputs"}, the golden
               samples batched as the device's health check runs them)}
    result:   {"onnxruntime", "machine" (the ISA it ran on), "available", "attempts": [[attempt, error or null], ...],
               "providers", "provider_options", "candidates": {name: {load_ms, p50_ms, p95_ms}
               or {error}}}
    outputs:  an NPZ with "CANDIDATE:I:OUTPUT" for sample I

Each attempt is a provider list tried in order (the class's device, then the CPU device); the
first under which the FP32 candidate loads picks the device for every candidate, each with the
options of its own precision. Sessions run on one
thread, sequential, as on the device and as the host-side measurement.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
LOAD_REPEATS = 3


def first_line(exc: BaseException) -> str:
    return ((str(exc).strip() or type(exc).__name__).splitlines() or [""])[0][:300]


def options(level: str) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = LEVELS[level]
    opts.log_severity_level = 3
    return opts


def providers(attempt: list[Any]) -> list[Any]:
    return [tuple(p) if isinstance(p, list) else p for p in attempt]


def open_session(path: str, level: str, attempt: list[Any]) -> ort.InferenceSession:
    return ort.InferenceSession(path, options(level), providers=providers(attempt))


def golden_request(req: dict[str, Any]) -> dict[str, Any] | None:
    """The golden samples' request ("golden": inputs, feeds, rows, outputs), batched as the device runs them."""
    golden = req.get("golden")
    return None if golden is None else {**req, **golden}


def feeds(req: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    with np.load(req["inputs"]) as npz:
        return [{name: npz[f"{i}:{name}"] for name in req["input_names"]} for i in range(req["feeds"])]


def predict(sess: ort.InferenceSession, req: dict[str, Any], data: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Every output per sample ("I:OUTPUT"), the array form split into rows."""
    out: dict[str, Any] = {}
    index = 0
    for feed, rows in zip(data, req["rows"], strict=True):
        got = sess.run(req["output_names"], feed)
        parts = range(rows) if req["array_form"] else [None]
        for part in parts:
            for name, value in zip(req["output_names"], got, strict=True):
                value = np.asarray(value)
                out[f"{index}:{name}"] = value if part is None else value[part:part + 1]
            index += 1
    return out


def single(req: dict[str, Any], data: list[dict[str, np.ndarray]], i: int) -> dict[str, np.ndarray]:
    """Sample i as one inference (the array form: one row, repeated to a fixed batch)."""
    if not req["array_form"]:
        return data[i]
    start = 0
    for feed, rows in zip(data, req["rows"], strict=True):
        if i < start + rows:
            row = {k: v[i - start:i - start + 1] for k, v in feed.items()}
            return {k: np.repeat(v, req["batch"], axis=0) for k, v in row.items()} if req["batch"] else row
        start += rows
    raise IndexError(i)


def load_ms(path: str, level: str, attempt: list[Any]) -> float:
    times = []
    for _ in range(LOAD_REPEATS):
        start = time.perf_counter()
        open_session(path, level, attempt)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def latencies(sessions: dict[str, ort.InferenceSession], req: dict[str, Any],
              data: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """p50/p95 single-inference latency per session, round-robin (as builder.model.validate)."""
    runs = req["latency_runs"]
    samples = [single(req, data, i) for i in req["latency_samples"]]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for i in range(req["warmup_runs"] + runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(req["output_names"], samples[i % len(samples)])
            if i >= req["warmup_runs"]:
                times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, t in times.items():
        p50, p95 = np.percentile(np.asarray(t), [50, 95])
        out[name] = {"p50_ms": float(p50), "p95_ms": float(p95)}
    return out


def choose_attempt(req: dict[str, Any], result: dict[str, Any]) -> tuple[int, ort.InferenceSession]:
    """The first provider list (its index) whose first provider runs the first (FP32) candidate.

    onnxruntime falls back to the next provider silently when one cannot be created (OpenVINO's
    GPU device where there is none, CUDA without a GPU): get_providers() says what runs. When no
    list gets its own first provider, the last one that loaded at all is used (the report says so).
    """
    first = req["candidates"][0]
    fallback: tuple[int, ort.InferenceSession] | None = None
    for i, attempt in enumerate(req["attempts"][first["precision"]]):
        want = providers(attempt)[0]
        want = want[0] if isinstance(want, tuple) else want
        try:
            sess = open_session(first["path"], req["graph_level"], attempt)
        except Exception as exc:  # onnxruntime's own types
            result["attempts"].append([attempt, first_line(exc)])
            continue
        if sess.get_providers()[0] == want:
            result["attempts"].append([attempt, None])
            return i, sess
        result["attempts"].append([attempt, f"{want} could not be created; onnxruntime fell back to "
                                             f"{sess.get_providers()[0]}"])
        fallback = (i, sess)
    if fallback is None:
        raise SystemExit(f"no provider list loads {first['path']}: "
                         + "; ".join(str(e) for _, e in result["attempts"]))
    return fallback


def given_options(attempt: list[Any]) -> dict[str, dict[str, str]]:
    """The options the request gave each provider (get_provider_options() is empty for OpenVINO)."""
    return {p[0]: dict(p[1]) for p in attempt if isinstance(p, list)}


def measure(req: dict[str, Any]) -> dict[str, Any]:
    x = feeds(req)
    result: dict[str, Any] = {"onnxruntime": ort.__version__, "machine": platform.machine(),
                              "available": ort.get_available_providers(),
                              "attempts": [], "candidates": {}}
    chosen, first = choose_attempt(req, result)
    result["providers"] = first.get_providers()
    result["provider_options"] = given_options(req["attempts"][req["candidates"][0]["precision"]][chosen])
    sessions: dict[str, ort.InferenceSession] = {}
    outputs: dict[str, Any] = {}
    golden_outputs: dict[str, Any] = {}
    greq = golden_request(req)
    gx = feeds(greq) if greq is not None else []
    for c in req["candidates"]:
        attempt = req["attempts"][c["precision"]][chosen]
        try:
            sess = open_session(c["path"], req["graph_level"], attempt)
            outputs.update({f"{c['name']}:{k}": v for k, v in predict(sess, req, x).items()})
            if greq is not None:
                golden_outputs.update({f"{c['name']}:{k}": v for k, v in predict(sess, greq, gx).items()})
            result["candidates"][c["name"]] = {"load_ms": load_ms(c["path"], req["graph_level"], attempt),
                                               "providers": sess.get_providers(),
                                               "provider_options": given_options(attempt)}
            sessions[c["name"]] = sess
        except Exception as exc:  # a candidate this runtime cannot load or run
            result["candidates"][c["name"]] = {"error": first_line(exc)}
    for name, timing in latencies(sessions, req, x).items():
        result["candidates"][name].update(timing)
    np.savez(req["outputs"], **outputs)
    if greq is not None:
        np.savez(greq["outputs"], **golden_outputs)
    return result


def main(argv: list[str]) -> int:
    req = json.loads(Path(argv[1]).read_text())
    result = measure(req)
    Path(req["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
