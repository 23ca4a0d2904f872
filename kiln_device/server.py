"""Kiln inference service (kiln-inference): every model in release.json, served over HTTP on 127.0.0.1.

Runs on the device as kiln-inference.service:

    /usr/lib/kiln/venv/bin/python -I /usr/lib/kiln/launch.py kiln-inference [--port 8470]

Standard library plus the runtime venv (onnxruntime, numpy); nothing from the
builder. Models are loaded by kiln_device.inference, as the health check loads them.

API (JSON in and out):
    GET  /healthz                      200 and the loaded models (only listening once all loaded)
    GET  /v1/models                    the same list
    POST /v1/models/<name>/infer       {"inputs": [[...]]} -> {"outputs": [...], "argmax": [...]}
         `inputs` is the whole input tensor as nested lists, batch first, e.g. [N, 1, 8, 8].
         400 bad JSON or shape, 404 unknown model, 411/413 missing or oversized body, 500 runtime failure.

Status: /var/lib/kiln/inference/status.json (written atomically: temp file, fsync,
rename), at most every --status-interval seconds while it changes: started_at,
models (name, version, sha256), requests/errors (POSTs; GET probes are not counted),
last_success_at, last_error, workers, degraded. A model that cannot be served is recorded there too.

Accelerator: when the models run on the CPU although the class asks for an accelerator
(kiln_device.inference), the class's fallback policy (release.json `fallback`,
kiln_device.degraded) decides: `degrade` serves on the CPU and records degraded and
why; `fail` exits 4. Either way /var/lib/kiln/inference/accelerator.json says so.

Workers: release.json `sharing` (time-slicing or MPS: `replicas` sessions per model sharing the
GPU, requests handed to them in turn; none: one). /healthz lists workers and requests per worker.

Exit codes: 0 stopped (SIGTERM/SIGINT), 1 runtime failure (cannot listen),
3 a model cannot be served (release.json unreadable, model missing, sha256
mismatch, does not load), 4 the accelerator is unavailable and the class's
fallback policy is fail, 64 usage.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import onnxruntime as ort

from kiln_device import degraded as dm
from kiln_device.common import Parser, first_line, write_json_atomic
from kiln_device.contract import ACCELERATOR_STATE, INFERENCE_STATUS, Release, under
from kiln_device.inference import (
    DEFAULT_PORT,
    HOST,
    RELEASE,
    BadRequest,
    LoadedModel,
    ModelProblem,
    accelerated_provider,
    choose_providers,
    fallback_policy,
    load_model,
    load_release,
    log,
    model_entries,
    now_iso,
    plain,
    verify_digest,
)

PORT_ENV = "KILN_INFERENCE_PORT"
STATUS = INFERENCE_STATUS.lstrip("/")
LATENCY_WINDOW = 1000  # successful requests the latency percentiles in the status file cover
ACCELERATOR = ACCELERATOR_STATE.lstrip("/")
MAX_BODY = 16 * 1024 * 1024
INFER_PATH = re.compile(r"^/v1/models/([^/?#]+)/infer/?$")

EXIT_OK, EXIT_FAILED, EXIT_MODEL, EXIT_ACCELERATOR, EXIT_USAGE = 0, 1, 3, 4, 64


class AcceleratorMissing(Exception):
    """The accelerator is unavailable and the class's fallback policy is `fail`."""


# -- workers sharing the accelerator -----------------------------------------------------------


def worker_count(release: Release) -> tuple[int, str]:
    """How many inference workers share the accelerator (release.json `sharing`), and why:
    time-slicing and MPS run `replicas` workers, each with its own session; no sharing runs one."""
    strategy = release.sharing.strategy if release.sharing is not None else "none"
    replicas = release.sharing.replicas if release.sharing is not None else 1
    if not 1 <= replicas <= 64:
        raise ModelProblem(f"/{RELEASE}: sharing.replicas must be a number from 1 to 64, got {replicas!r}")
    if strategy == "time-slicing":
        return replicas, f"time-slicing: {replicas} workers share the GPU"
    if strategy == "mps":
        return replicas, (f"MPS: {replicas} workers as MPS clients (their kernels run concurrently only "
                          "while nvidia-cuda-mps-control runs; without it the GPU time-slices them)")
    if strategy == "none":
        return 1, "no GPU sharing: 1 worker"
    raise ModelProblem(f"/{RELEASE}: unknown sharing.strategy {strategy!r}")


class ModelPool:
    """The workers of one model: sessions sharing the accelerator, handed out in turn (FIFO)."""

    def __init__(self, workers: list[LoadedModel]) -> None:
        self.workers = workers
        self.served = [0] * len(workers)
        self.lock = threading.Lock()
        self.idle: queue.Queue[int] = queue.Queue()
        for i in range(len(workers)):
            self.idle.put(i)

    @property
    def first(self) -> LoadedModel:
        return self.workers[0]

    @contextmanager
    def worker(self) -> Iterator[LoadedModel]:
        i = self.idle.get()
        try:
            with self.lock:
                self.served[i] += 1
            yield self.workers[i]
        finally:
            self.idle.put(i)

    def describe(self) -> dict[str, Any]:
        with self.lock:
            served = list(self.served)
        return {**self.first.describe(), "workers": len(self.workers), "served_by_worker": served}


@dataclass(frozen=True)
class Loaded:
    """What the service serves: one pool per model, and how it stands with the accelerator."""

    pools: list[ModelPool]
    fallback: dm.Fallback
    accelerated: str | None
    sharing: str

    @property
    def models(self) -> list[LoadedModel]:
        return [p.first for p in self.pools]

    @property
    def degraded_reason(self) -> str | None:
        return next((m.degraded_reason for m in self.models if m.degraded_reason), None)

    def accelerator_state(self, root: Path) -> dict[str, Any]:
        """contract.ACCELERATOR_STATE: what `kiln-agent status` and people read about the accelerator."""
        reason = self.degraded_reason
        return {**dm.state(reason is not None, reason, root), "updated_at": now_iso(),
                "policy": self.fallback.policy, "accelerated": self.accelerated,
                "running": {m.entry.name: m.session.get_providers()[0] for m in self.models},
                "workers": len(self.pools[0].workers) if self.pools else 0, "sharing": self.sharing}


def load_models(root: Path, threads: int) -> Loaded:
    """Every model, `worker_count` sessions each; AcceleratorMissing when the accelerator is
    unavailable and the class's fallback policy is fail."""
    release = load_release(root)
    entries = model_entries(release, root)
    providers = choose_providers(release)
    fallback = fallback_policy(release)
    workers, sharing = worker_count(release)
    pools = []
    for entry in entries:
        verify_digest(entry)
        pools.append(ModelPool([load_model(entry, providers, threads, release=release) for _ in range(workers)]))
    loaded = Loaded(pools, fallback, accelerated_provider(release), sharing)
    reason = loaded.degraded_reason
    if reason is not None and not fallback.degrades:
        raise AcceleratorMissing(f"{reason}; the class's fallback policy is fail")
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
            "latencyMs": None,  # p50/p95/p99 of the last LATENCY_WINDOW successful requests (the agent reports it)
        }
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    def update(self, **fields: Any) -> None:
        with self.lock:
            self.data.update(fields)
        self.changed.set()

    def record(self, model: str | None, status: int, error: str | None, seconds: float | None = None) -> None:
        at = now_iso()
        with self.lock:
            d = self.data
            if seconds is not None and error is None:
                self.latencies.append(seconds * 1000)
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
            ordered = sorted(self.latencies)
            if ordered:
                self.data["latencyMs"] = {"window": len(ordered), **{
                    f"p{q}": round(ordered[min(len(ordered) - 1, len(ordered) * q // 100)], 3) for q in (50, 95, 99)}}
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

    def __init__(self, port: int, loaded: Loaded, status: Status) -> None:
        self.models = {p.first.entry.name: p for p in loaded.pools}
        self.loaded = loaded
        self.status = status
        super().__init__((HOST, port), Handler)

    def listing(self) -> dict[str, Any]:
        return {"ready": True, "models": [p.describe() for p in self.models.values()],
                "degraded": self.loaded.degraded_reason is not None,
                "degraded_reason": self.loaded.degraded_reason, "sharing": self.loaded.sharing}

    def infer(self, name: str, body: bytes) -> dict[str, Any]:
        pool = self.models.get(name)
        if pool is None:
            raise BadRequest(f"unknown model {name!r}; this device serves: {', '.join(self.models)}",
                             HTTPStatus.NOT_FOUND)
        try:
            request = json.loads(body, parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"request body is not valid JSON: {first_line(exc)}") from None
        if not isinstance(request, dict) or "inputs" not in request:
            raise BadRequest('expected a JSON object {"inputs": [[...]]}')
        x = pool.first.to_input(request["inputs"])
        try:
            with pool.worker() as model:
                out = model.run(x)
        except Exception as exc:  # onnxruntime's own exception types
            raise BadRequest(f"inference failed: {first_line(exc)}", HTTPStatus.INTERNAL_SERVER_ERROR) from None
        return {"model": name, "version": pool.first.entry.version, "outputs": out.tolist(),
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
            started = time.perf_counter()
            result = self.server.infer(name, self._body())
            took = time.perf_counter() - started
        except BadRequest as exc:
            known = name if name in self.server.models else None
            self.server.status.record(known, exc.status, str(exc))
            if exc.status >= 500:
                log(f"error: POST {self.path}: {exc}")
            self._reply(exc.status, {"error": str(exc)})
            return
        self.server.status.record(name, HTTPStatus.OK, None, took)
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
    parser.add_argument("--accelerator-state", type=Path, default=None,
                        help=f"accelerator state file: providers in use, degraded and why (default ROOT/{ACCELERATOR})")
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
    args.accelerator_state = args.accelerator_state or under(args.root, ACCELERATOR)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = Status(args.status, args.status_interval)
    try:
        loaded = load_models(args.root, args.threads)
        server = InferenceServer(args.port, loaded, status)
    except ModelProblem as exc:
        return _fail(status, f"cannot serve: {exc}", EXIT_MODEL)
    except AcceleratorMissing as exc:
        write_accelerator_state(args.accelerator_state, {**dm.state(False, None, args.root), "updated_at": now_iso(),
                                                         "policy": dm.FAIL, "failed": str(exc)})
        return _fail(status, f"cannot serve: {exc}", EXIT_ACCELERATOR)
    except OSError as exc:
        return _fail(status, f"cannot listen on {HOST}:{args.port}: {first_line(exc)}", EXIT_FAILED)
    models = loaded.models
    port = server.server_address[1]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    write_accelerator_state(args.accelerator_state, loaded.accelerator_state(args.root))
    status.update(ready=True, address=f"http://{HOST}:{port}", port=port,
                  models=[m.entry.describe() for m in models], workers=len(loaded.pools[0].workers),
                  sharing=loaded.sharing, degraded=loaded.degraded_reason is not None,
                  degraded_reason=loaded.degraded_reason)
    status.start()
    names = ", ".join(f"{m.entry.name} {m.entry.version} ({m.session.get_providers()[0]})" for m in models)
    log(f"serving {names} on http://{HOST}:{port}; {loaded.sharing}")
    if loaded.degraded_reason:
        log(f"degraded: {loaded.degraded_reason} (the class's fallback policy is degrade)")
    notify(f"READY=1\nSTATUS=serving {len(models)} model(s) on {HOST}:{port}")
    server.serve_forever(poll_interval=0.5)
    notify("STOPPING=1")
    server.server_close()
    status.update(ready=False, stopped_at=now_iso())
    status.stop()
    log("stopped")
    return EXIT_OK


def write_accelerator_state(path: Path, data: dict[str, Any]) -> None:
    try:
        write_json_atomic(path, data)
    except OSError as exc:
        log(f"error: cannot write {path}: {first_line(exc)}")


def _fail(status: Status, message: str, code: int) -> int:
    log(f"error: {message}")
    status.update(ready=False, last_error={"at": now_iso(), "model": None, "status": None, "message": message})
    status.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
