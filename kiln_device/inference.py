"""The models as the device runs them: release.json, verified model files, execution providers.

Standard library plus the runtime venv (onnxruntime, numpy); nothing from the builder.
kiln_device.server (the inference service, kiln-inference) and kiln_device.health (the
golden check) both load models through here, so the check verifies and opens models
exactly as the service does.

Accelerator: sessions get the class's execution providers in order (onnxruntime.preload_dlls()
first, for onnxruntime-gpu's CUDA wheels). A session that ends up on CPUExecutionProvider although
the class asks for an accelerator means the accelerator is unavailable (onnxruntime-gpu falls back
silently; session.get_providers() tells): LoadedModel.degraded_reason says why, and the caller
applies the class's fallback policy (release.json `fallback`, kiln_device.degraded).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kiln_device import degraded as dm
from kiln_device.common import first_line, make_logger, sha256_file
from kiln_device.contract import RELEASE_JSON, ContractError, Release, Runtime, parse_release, under
from kiln_device.gpu import probe_dgpu

HOST = "127.0.0.1"  # never reachable from the network
DEFAULT_PORT = 8470
RELEASE = RELEASE_JSON.lstrip("/")
CPU = dm.CPU
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")  # need onnxruntime.preload_dlls()
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
    # The model's own latency envelope (release.json p95LatencyMs / fallbackP95LatencyMs on the
    # model), where it differs from the class's.
    p95_latency_ms: float | None = None
    fallback_p95_latency_ms: float | None = None

    @property
    def directory(self) -> Path:
        return self.file.parent

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "precision": self.precision,
                "sha256": self.sha256, "path": self.path}


def load_release(root: Path) -> Release:
    """The image's release.json, through the contract's record (a located ModelProblem when malformed)."""
    path = under(root, RELEASE)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelProblem(f"/{RELEASE} is missing (looked in {path})") from None
    except (OSError, ValueError) as exc:
        raise ModelProblem(f"/{RELEASE} is unreadable: {first_line(exc)}") from None
    try:
        return parse_release(data, f"/{RELEASE}")
    except ContractError as exc:
        raise ModelProblem(str(exc)) from None


def model_entries(release: Release, root: Path) -> list[ModelEntry]:
    if not release.models:
        raise ModelProblem(f"/{RELEASE} lists no models")
    return [ModelEntry(m.name, m.version, m.precision, m.sha256, m.path, under(root, m.path), m.p95_latency_ms,
                       m.fallback_p95_latency_ms) for m in release.models]


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


def choose_providers(release: Release) -> list[str]:
    """The class's execution providers this onnxruntime has; CPU only where the class allows it."""
    wanted = list(release.execution_providers)
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    usable = [p for p in wanted if p in available]
    if not wanted:
        raise ModelProblem("release.json names no execution provider")
    if missing:
        # The sessions then run on the CPU: accelerator_problem says so and the class's fallback decides.
        usable = usable or [CPU]
        log(f"note: {', '.join(missing)} not available in onnxruntime {ort.__version__}; "
            f"trying {', '.join(usable)}")
    preload_libraries(usable)
    return usable


# -- the accelerator: is it there, and what when it is not (kiln_device.degraded) ------------

_preloaded: list[bool] = []


def preload_libraries(usable: list[str]) -> None:
    """onnxruntime-gpu finds the CUDA/cuDNN libraries of its nvidia-* wheels only after preload_dlls()."""
    if _preloaded or not any(p in CUDA_PROVIDERS for p in usable) or not hasattr(ort, "preload_dlls"):
        return
    _preloaded.append(True)
    try:
        ort.preload_dlls()
    except Exception as exc:  # a missing library shows up again as the session falling back
        log(f"note: onnxruntime.preload_dlls() failed: {first_line(exc)}")


def accelerated_provider(release: Release) -> str | None:
    """The first execution provider the class asks for that is not the CPU (None: a CPU class)."""
    return next((p for p in release.execution_providers if p != CPU), None)


def fallback_policy(release: Release) -> dm.Fallback:
    return dm.parse_fallback(release)


def accelerator_problem(release: Release, sess: ort.InferenceSession, error: str | None) -> str | None:
    """Why this session runs on the CPU although the class asks for an accelerator (None: it does not).
    onnxruntime-gpu without a GPU falls back to the CPU silently: the session's providers tell."""
    accelerated = accelerated_provider(release)
    running = sess.get_providers()[0]
    if accelerated is None or running != CPU:
        return None
    if error is None and accelerated not in ort.get_available_providers():
        error = (f"not in this onnxruntime {ort.__version__} build (it has "
                 f"{', '.join(p for p in ort.get_available_providers() if p != 'AzureExecutionProvider')})")
    if error is None and accelerated in CUDA_PROVIDERS:
        probe = probe_dgpu(Path("/"))  # onnxruntime logs why; the device nodes say it in one line
        error = probe.reason() if not probe.visible else None
    why = error or "onnxruntime fell back to the CPU (its log says why)"
    return f"{accelerated} unavailable: {why}; running on {CPU}"




OPENVINO = "OpenVINOExecutionProvider"
OPENVINO_DEVICES = ("CPU", "GPU", "NPU")


def provider_options(runtime: Runtime | None, provider: str, *, precision: str = "fp32",
                     device: str | None = None, threads: int = 1) -> dict[str, str]:
    """The options a session gives `provider` for a model of `precision` ({} for the rest).

    OpenVINO: `device_type` is `device` (a fallback's choice), else release.json's
    runtime.device (`runtime`), else CPU; the precision hint is pinned, never OpenVINO's default:
    FP16 for a non-FP32 model on a GPU or NPU (what they run natively), FP32 otherwise,
    and always FP32 on the CPU (its plugin would run bf16 on AMX CPUs, and the golden
    set is the build host's FP32 arithmetic). `num_of_threads` as the build measured.
    """
    if provider != OPENVINO:
        return {}
    wanted = device or (runtime.device if runtime is not None else None) or "CPU"
    kind = str(wanted).split(".")[0].upper()  # "GPU.0" -> GPU
    if kind not in OPENVINO_DEVICES:
        raise ModelProblem(f"{OPENVINO}: unknown OpenVINO device {wanted!r} (one of {', '.join(OPENVINO_DEVICES)})")
    hint = "FP16" if kind != "CPU" and precision != "fp32" else "FP32"
    options = {"device_type": str(wanted), "precision": hint}
    if kind == "CPU":
        options["num_of_threads"] = str(threads)
    return options


def openvino_options(providers: list[Any]) -> dict[str, str] | None:
    """The options given to OpenVINO in a session's provider list (None: none given)."""
    return next((dict(p[1]) for p in providers if isinstance(p, tuple) and p[0] == OPENVINO), None)


def openvino_device(model: LoadedModel) -> dict[str, Any]:
    """{"openvino": {"device_type", "precision"}} when the session runs OpenVINO, else {}.

    From the options the session was given: onnxruntime-openvino 1.24's get_provider_options()
    returns none for OpenVINO. A device OpenVINO lacks never gets here: onnxruntime then falls
    back to the CPU provider (measured: device GPU on a host without one).
    """
    if OPENVINO not in model.session.get_providers() or not model.openvino:
        return {}
    return {"openvino": {k: model.openvino.get(k) for k in ("device_type", "precision")}}


def session_providers(runtime: Runtime | None, providers: list[str], *, precision: str = "fp32",
                      device: str | None = None, threads: int = 1) -> list[str | tuple[str, dict[str, str]]]:
    """`providers` as InferenceSession takes them: (name, options) where provider_options has some."""
    out: list[str | tuple[str, dict[str, str]]] = []
    for p in providers:
        options = provider_options(runtime, p, precision=precision, device=device, threads=threads)
        out.append((p, options) if options else p)
    return out


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
    degraded_reason: str | None = None  # the accelerator is unavailable: runs on the CPU (accelerator_problem)
    openvino: dict[str, str] | None = None  # the options OpenVINO was given (provider_options)

    @property
    def fixed_batch(self) -> int | None:
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) and first > 0 else None

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.input_shape) + "]"

    def describe(self) -> dict[str, Any]:
        return {**self.entry.describe(), "input": self.input_name, "input_shape": self.shape_text(),
                "output": self.output_name, "providers": self.session.get_providers(),
                **openvino_device(self), "load_ms": round(self.load_ms, 3),
                "degraded_reason": self.degraded_reason}

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


def load_model(entry: ModelEntry, providers: list[str], threads: int, *,
               release: Release | None = None, device: str | None = None) -> LoadedModel:
    """Open a verified model file in onnxruntime; failure is a ModelProblem.

    With `release`, each provider gets its provider_options (OpenVINO: device and precision hint),
    and an unavailable accelerator is no failure here: the session runs on the CPU, `degraded_reason`
    says why and the caller applies the class's fallback policy.
    """
    start = time.perf_counter()
    with_options = session_providers(release.runtime, providers, precision=entry.precision, device=device,
                                     threads=threads) if release is not None else list(providers)
    error = None
    try:
        sess = ort.InferenceSession(str(entry.file), session_options(graph_level(entry), threads),
                                    providers=with_options)
    except Exception as exc:  # onnxruntime raises its own exception types
        if release is None or accelerated_provider(release) is None:
            raise ModelProblem(f"model {entry.name} {entry.version}: {entry.path} does not load in "
                               f"onnxruntime: {first_line(exc)}") from None
        sess, error = cpu_session(entry, threads, first_line(exc))
    openvino_reason = None
    if release is not None and device is None and sess.get_providers()[0] != providers[0] == OPENVINO:
        # OpenVINO without its device (an iGPU box's image in QEMU): onnxruntime fell back to its
        # plain CPU provider. OpenVINO's own CPU device still runs the model the class's way.
        cpu = openvino_cpu_session(entry, providers, release, threads)
        if cpu is not None:
            wanted = provider_options(release.runtime, OPENVINO, precision=entry.precision)["device_type"]
            sess, with_options = cpu
            openvino_reason = f"{OPENVINO} device {wanted} unavailable; running on {OPENVINO} (CPU device)"
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
    reason = openvino_reason or (accelerator_problem(release, sess, error) if release is not None else None)
    return LoadedModel(entry, sess, inputs[0].name, tuple(inputs[0].shape), dtype, outputs[0].name, load_ms,
                       reason, openvino_options(with_options))


def openvino_cpu_session(entry: ModelEntry, providers: list[str], release: Release,
                         threads: int) -> tuple[ort.InferenceSession, list[Any]] | None:
    """The model on OpenVINO's CPU device (None: that does not run it either)."""
    options = session_providers(release.runtime, providers, precision=entry.precision, device="CPU", threads=threads)
    try:
        sess = ort.InferenceSession(str(entry.file), session_options(graph_level(entry), threads), providers=options)
    except Exception:
        return None
    return (sess, options) if sess.get_providers()[0] == OPENVINO else None


def cpu_session(entry: ModelEntry, threads: int, error: str) -> tuple[ort.InferenceSession, str]:
    """The model on the CPU alone, after its accelerator refused it: it is broken only when this fails too."""
    try:
        sess = ort.InferenceSession(str(entry.file), session_options(graph_level(entry), threads), providers=[CPU])
    except Exception as exc:
        raise ModelProblem(f"model {entry.name} {entry.version}: {entry.path} does not load in "
                           f"onnxruntime: {first_line(exc)}") from None
    return sess, f"{error} (creating the session)"
