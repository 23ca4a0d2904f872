"""Kiln inference service: every model in release.json, served over HTTP on 127.0.0.1.

Runs on the device as kiln-inference.service:

    /usr/lib/kiln/venv/bin/python -I /usr/lib/kiln/launch.py kiln-inference [--port 8470]

Standard library plus the runtime venv (onnxruntime, numpy); nothing from the
builder. kiln_device.health imports the loading half of this module, so
the health check verifies and opens models exactly as the service does.

API (JSON in and out):
    GET  /healthz                      200 and the loaded models (only listening once all loaded)
    GET  /v1/models                    the same list
    POST /v1/models/<name>/infer       {"inputs": [[...]]} -> {"outputs": [...], "argmax": [...]}
         `inputs` is the whole input tensor as nested lists, batch first, e.g. [N, 1, 8, 8].
         400 bad JSON or shape, 404 unknown model, 411/413 missing or oversized body, 500 runtime failure.

Status: /var/lib/kiln/inference/status.json (written atomically: temp file, fsync,
rename), at most every --status-interval seconds while it changes: started_at,
models (name, version, sha256), requests/errors (POSTs; GET probes are not counted),
last_success_at, last_error. A model that cannot be served is recorded there too.

Exit codes: 0 stopped (SIGTERM/SIGINT), 1 runtime failure (cannot listen),
3 a model cannot be served (release.json unreadable, model missing, sha256
mismatch, does not load, no usable execution provider), 64 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kiln_device.common import Parser, first_line, make_logger, sha256_file, write_json_atomic
from kiln_device.contract import INFERENCE_STATUS, RELEASE_JSON, under

HOST = "127.0.0.1"  # never reachable from the network
DEFAULT_PORT = 8470
PORT_ENV = "KILN_INFERENCE_PORT"
RELEASE = RELEASE_JSON.lstrip("/")
STATUS = INFERENCE_STATUS.lstrip("/")
CPU = "CPUExecutionProvider"
GRAPH_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
DEFAULT_GRAPH_LEVEL = "extended"  # the builder's default policy
DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
          "tensor(uint8)": np.uint8}
MAX_BODY = 16 * 1024 * 1024
INFER_PATH = re.compile(r"^/v1/models/([^/?#]+)/infer/?$")

EXIT_OK, EXIT_FAILED, EXIT_MODEL, EXIT_USAGE = 0, 1, 3, 64


class ModelProblem(Exception):
    """A model (or release.json) that cannot be served as shipped."""


class BadRequest(Exception):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


log = make_logger("kiln-inference")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def plain(value: object) -> object:
    """json.dump's fallback: numpy scalars as Python numbers (and bools)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- release.json and model files ----------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model as release.json lists it; `file` is its path inside the tree."""

    name: str
    version: str
    precision: str
    sha256: str
    path: str
    file: Path

    @property
    def directory(self) -> Path:
        return self.file.parent

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "precision": self.precision,
                "sha256": self.sha256, "path": self.path}


def load_release(root: Path) -> dict[str, Any]:
    path = under(root, RELEASE)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelProblem(f"/{RELEASE} is missing (looked in {path})") from None
    except (OSError, ValueError) as exc:
        raise ModelProblem(f"/{RELEASE} is unreadable: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ModelProblem(f"/{RELEASE} is not a JSON object")
    return data


def model_entries(release: dict[str, Any], root: Path) -> list[ModelEntry]:
    models = release.get("models")
    if not isinstance(models, list) or not models:
        raise ModelProblem(f"/{RELEASE} lists no models")
    entries = []
    for i, m in enumerate(models):
        keys = ("name", "version", "sha256", "path")
        if not isinstance(m, dict) or not all(isinstance(m.get(k), str) and m[k] for k in keys):
            raise ModelProblem(f"/{RELEASE}: models[{i}] needs string fields {', '.join(keys)}")
        entries.append(ModelEntry(m["name"], m["version"], str(m.get("precision", "?")), m["sha256"],
                                  m["path"], under(root, m["path"])))
    return entries


def verify_digest(entry: ModelEntry) -> None:
    """Refuse a model file that is not byte for byte the one the release names."""
    try:
        actual = sha256_file(entry.file)
    except FileNotFoundError:
        raise ModelProblem(f"model {entry.name} {entry.version}: {entry.path} is missing") from None
    except OSError as exc:
        raise ModelProblem(f"model {entry.name} {entry.version}: cannot read {entry.path}: "
                           f"{first_line(exc)}") from None
    if actual != entry.sha256:
        raise ModelProblem(f"model {entry.name} {entry.version}: sha256 of {entry.path} is {actual}, "
                           f"release.json says {entry.sha256}; refusing a modified model")


def graph_level(entry: ModelEntry) -> str:
    """The graph optimization level the build validated with (report.json), else the default."""
    try:
        report = json.loads((entry.directory / "report.json").read_text())
        level = report["policy"]["graph_level"]
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_GRAPH_LEVEL
    return level if level in GRAPH_LEVELS else DEFAULT_GRAPH_LEVEL


def choose_providers(release: dict[str, Any]) -> list[str]:
    """The class's execution providers this onnxruntime has; CPU only where the class allows it."""
    runtime = release.get("runtime") if isinstance(release.get("runtime"), dict) else {}
    wanted = [p for p in (runtime or {}).get("executionProviders") or [CPU] if isinstance(p, str)]
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    usable = [p for p in wanted if p in available]
    if missing and CPU not in wanted:
        raise ModelProblem(f"execution provider(s) {', '.join(missing)} not available in onnxruntime "
                           f"{ort.__version__} (available: {', '.join(available)}) and the class "
                           f"does not allow {CPU}")
    if missing:
        log(f"note: {', '.join(missing)} not available in onnxruntime {ort.__version__}; "
            f"falling back to {', '.join(usable)} as the class allows")
    if not usable:
        raise ModelProblem("release.json names no execution provider")
    return usable


def session_options(level: str, threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = GRAPH_LEVELS[level]
    opts.log_severity_level = 3
    return opts


Dim = int | str | None  # str/None: a dynamic dimension


@dataclass(frozen=True)
class LoadedModel:
    entry: ModelEntry
    session: ort.InferenceSession
    input_name: str
    input_shape: tuple[Dim, ...]
    input_dtype: Any
    output_name: str
    load_ms: float

    @property
    def fixed_batch(self) -> int | None:
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) and first > 0 else None

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.input_shape) + "]"

    def describe(self) -> dict[str, Any]:
        return {**self.entry.describe(), "input": self.input_name, "input_shape": self.shape_text(),
                "output": self.output_name, "providers": self.session.get_providers(),
                "load_ms": round(self.load_ms, 3)}

    def run(self, x: np.ndarray) -> np.ndarray:
        """The first output for `x`, which must already fit the input shape."""
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0])

    def run_all(self, x: np.ndarray) -> np.ndarray:
        """Outputs for any number of samples, chunked and padded to a fixed batch size."""
        return np.concatenate([self.run(chunk)[:n] for chunk, n in batches(x, self.fixed_batch)])

    def to_input(self, value: object) -> np.ndarray:
        """A JSON value as the model's input tensor; BadRequest says what is wrong."""
        try:
            x = np.asarray(value, dtype=self.input_dtype)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"inputs must be a rectangular nested list of numbers: {first_line(exc)}") from None
        dims_ok = x.ndim == len(self.input_shape) and all(
            not isinstance(d, int) or d == s for d, s in zip(self.input_shape, x.shape, strict=False))
        if not dims_ok or x.size == 0:
            raise BadRequest(f"inputs has shape {list(x.shape)}; model {self.entry.name} expects "
                             f"{self.shape_text()} (batch first)")
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            raise BadRequest("inputs hold NaN, infinite or null values")
        return x


def batches(x: np.ndarray, fixed: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(chunk, real samples in it): all at once for a dynamic batch, else padded chunks."""
    if fixed is None:
        yield x, len(x)
        return
    for i in range(0, len(x), fixed):
        chunk = x[i:i + fixed]
        n = len(chunk)
        if n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
        yield chunk, n


def load_model(entry: ModelEntry, providers: list[str], threads: int) -> LoadedModel:
    """Open a verified model file in onnxruntime; failure is a ModelProblem."""
    start = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(entry.file), session_options(graph_level(entry), threads),
                                    providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelProblem(f"model {entry.name} {entry.version}: {entry.path} does not load in "
                           f"onnxruntime: {first_line(exc)}") from None
    load_ms = (time.perf_counter() - start) * 1e3
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ModelProblem(f"model {entry.name}: expected one input and at least one output, found "
                           f"{len(inputs)} input(s), {len(outputs)} output(s)")
    dtype = DTYPES.get(inputs[0].type)
    if dtype is None:
        raise ModelProblem(f"model {entry.name}: unsupported input type {inputs[0].type}")
    if sess.get_providers()[0] != providers[0]:
        log(f"note: model {entry.name} runs on {sess.get_providers()[0]}, not {providers[0]}")
    return LoadedModel(entry, sess, inputs[0].name, tuple(inputs[0].shape), dtype, outputs[0].name, load_ms)


def load_models(root: Path, threads: int) -> list[LoadedModel]:
    release = load_release(root)
    entries = model_entries(release, root)
    providers = choose_providers(release)
    loaded = []
    for entry in entries:
        verify_digest(entry)
        loaded.append(load_model(entry, providers, threads))
    return loaded


# -- status file ----------------------------------------------------------------------------


class Status:
    """Counters and the status file, written by one thread at most every `interval` seconds."""

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.write_failed = False
        self.data: dict[str, Any] = {
            "pid": os.getpid(), "started_at": now_iso(), "ready": False, "address": None,
            "models": [], "requests": 0, "successes": 0, "errors": 0, "by_model": {},
            "last_success_at": None, "last_error": None, "onnxruntime": ort.__version__,
        }

    def update(self, **fields: Any) -> None:
        with self.lock:
            self.data.update(fields)
        self.changed.set()

    def record(self, model: str | None, status: int, error: str | None) -> None:
        at = now_iso()
        with self.lock:
            d = self.data
            fresh: dict[str, Any] = {"requests": 0, "errors": 0, "last_success_at": None}
            per = d["by_model"].setdefault(model, fresh) if model else fresh  # unknown model: no entry
            d["requests"] += 1
            per["requests"] += 1
            if error is None:
                d["successes"] += 1
                d["last_success_at"] = per["last_success_at"] = at
            else:
                d["errors"] += 1
                per["errors"] += 1
                d["last_error"] = {"at": at, "model": model, "status": status, "message": error}
        self.changed.set()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps({**self.data, "updated_at": now_iso()}))

    def flush(self) -> None:
        try:
            write_json_atomic(self.path, self.snapshot(), default=plain)
        except OSError as exc:
            if not self.write_failed:
                log(f"error: cannot write status file {self.path}: {first_line(exc)}")
            self.write_failed = True
        else:
            self.write_failed = False

    def start(self) -> None:
        self.flush()
        self.thread = threading.Thread(target=self._loop, name="status", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            if self.changed.wait(timeout=1.0):
                self.changed.clear()
                self.flush()
                self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.flush()


# -- HTTP -------------------------------------------------------------------------------------


class InferenceServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, models: list[LoadedModel], status: Status) -> None:
        self.models = {m.entry.name: m for m in models}
        self.status = status
        super().__init__((HOST, port), Handler)

    def listing(self) -> dict[str, Any]:
        return {"ready": True, "models": [m.describe() for m in self.models.values()]}

    def infer(self, name: str, body: bytes) -> dict[str, Any]:
        model = self.models.get(name)
        if model is None:
            raise BadRequest(f"unknown model {name!r}; this device serves: {', '.join(self.models)}",
                             HTTPStatus.NOT_FOUND)
        try:
            request = json.loads(body, parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"request body is not valid JSON: {first_line(exc)}") from None
        if not isinstance(request, dict) or "inputs" not in request:
            raise BadRequest('expected a JSON object {"inputs": [[...]]}')
        x = model.to_input(request["inputs"])
        try:
            out = model.run(x)
        except Exception as exc:  # onnxruntime's own exception types
            raise BadRequest(f"inference failed: {first_line(exc)}", HTTPStatus.INTERNAL_SERVER_ERROR) from None
        return {"model": name, "version": model.entry.version, "outputs": out.tolist(),
                "argmax": out.reshape(len(out), -1).argmax(axis=1).tolist()}


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


class Handler(BaseHTTPRequestHandler):
    server: InferenceServer
    server_version = "kiln-inference"
    sys_version = ""

    def do_GET(self) -> None:
        if self.path in ("/healthz", "/v1/models"):
            self._reply(HTTPStatus.OK, self.server.listing())
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {self.path}"})

    def do_POST(self) -> None:
        match = INFER_PATH.match(self.path)
        name = match.group(1) if match else None
        try:
            if name is None:
                raise BadRequest(f"no such endpoint: POST {self.path}", HTTPStatus.NOT_FOUND)
            result = self.server.infer(name, self._body())
        except BadRequest as exc:
            known = name if name in self.server.models else None
            self.server.status.record(known, exc.status, str(exc))
            if exc.status >= 500:
                log(f"error: POST {self.path}: {exc}")
            self._reply(exc.status, {"error": str(exc)})
            return
        self.server.status.record(name, HTTPStatus.OK, None)
        self._reply(HTTPStatus.OK, result)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(f"bad Content-Length {length!r}") from None
        if size < 0 or size > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(size)

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode() + b"\n"
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        return None  # per-request lines would flood the journal; errors are logged above


# -- main -----------------------------------------------------------------------------------


def notify(message: str) -> None:
    """sd_notify(3) for Type=notify, without libsystemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log(f"warning: sd_notify failed: {first_line(exc)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="kiln-inference", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, usage_code=EXIT_USAGE)
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="tree holding usr/lib/kiln/release.json and the models (default /)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"TCP port on {HOST} (default ${PORT_ENV} or {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--status", type=Path, default=None,
                        help=f"status file (default ROOT/{STATUS})")
    parser.add_argument("--status-interval", type=float, default=1.0,
                        help="minimum seconds between status file writes (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per model (default 1, as the build measured latency)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: not a directory")
    if args.port is None:
        env = os.environ.get(PORT_ENV, str(DEFAULT_PORT))
        if not env.isdigit():
            parser.error(f"${PORT_ENV}={env!r} is not a port number")
        args.port = int(env)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number")
    if args.threads < 1 or args.status_interval < 0:
        parser.error("--threads must be >= 1 and --status-interval >= 0")
    args.status = args.status or under(args.root, STATUS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = Status(args.status, args.status_interval)
    try:
        models = load_models(args.root, args.threads)
        server = InferenceServer(args.port, models, status)
    except ModelProblem as exc:
        return _fail(status, f"cannot serve: {exc}", EXIT_MODEL)
    except OSError as exc:
        return _fail(status, f"cannot listen on {HOST}:{args.port}: {first_line(exc)}", EXIT_FAILED)
    port = server.server_address[1]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    status.update(ready=True, address=f"http://{HOST}:{port}", port=port,
                  models=[m.entry.describe() for m in models])
    status.start()
    names = ", ".join(f"{m.entry.name} {m.entry.version} ({m.session.get_providers()[0]})" for m in models)
    log(f"serving {names} on http://{HOST}:{port}")
    notify(f"READY=1\nSTATUS=serving {len(models)} model(s) on {HOST}:{port}")
    server.serve_forever(poll_interval=0.5)
    notify("STOPPING=1")
    server.server_close()
    status.update(ready=False, stopped_at=now_iso())
    status.stop()
    log("stopped")
    return EXIT_OK


def _fail(status: Status, message: str, code: int) -> int:
    log(f"error: {message}")
    status.update(ready=False, last_error={"at": now_iso(), "model": None, "status": None, "message": message})
    status.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
