"""The class's own runtime in the gate: candidates measured under it, in a subprocess.

The host measures every candidate with its own CPU onnxruntime. When the class ships another
runtime (onnxruntime-openvino, onnxruntime-gpu), the same candidates are measured again under
that runtime, installed in a venv of its own (builder.model.runtime_venv), by runtime_worker.py run
with that venv's python; the gates then apply to those figures. Nothing here knows about specs:
the glue (builder.model.for_class) says what the runtime is and where its python is.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builder.core.errors import CommandFailed, ModelError
from builder.core.run import run

WORKER = Path(__file__).with_name("runtime_worker.py")
WARMUP_RUNS = 10
TIMEOUT_S = 900
CPU = "CPUExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"

Provider = str | tuple[str, dict[str, str]]


@dataclass(frozen=True, kw_only=True)
class Container:
    """The runtime inside an image of the class's own architecture, run by podman (under qemu-user on
    a host of another architecture): the gate's figures and the golden outputs then come from the
    target's ISA, not the build host's (INT8 kernels differ between x86 and arm64)."""

    image: str
    python: str  # inside the image
    platform: str  # linux/arm64
    isa: str  # aarch64
    env: dict[str, str] = field(default_factory=dict)  # the engine's (its storage)
    emulated: bool = True
    cpuinfo: Path | None = None  # mounted as /proc/cpuinfo (builder.model.runtime_image: qemu-user shows the host's)
    cpu: str | None = None  # QEMU_CPU for qemu-user: the emulated device's CPU (builder.base.emulation.EMULATED_CPU)

    def argv(self, read_only: Sequence[Path], writable: Path) -> list[str]:
        """`podman run` with each path mounted at the same place, so the request's paths hold inside."""
        # the paths as the request and the command line name them (podman follows links in the source)
        mounts = [f"{p}:{p}:ro" for p in sorted({q.absolute() for q in read_only})] + [f"{writable}:{writable}"]
        if self.cpuinfo is not None:
            mounts.append(f"{self.cpuinfo}:/proc/cpuinfo:ro")
        cpu = ["--env", f"QEMU_CPU={self.cpu}"] if self.cpu else []
        return ["podman", "run", "--rm", "--pull", "never", "--platform", self.platform, "--network", "none", *cpu,
                *(a for m in mounts for a in ("--volume", m)), self.image, self.python]


@dataclass(frozen=True, kw_only=True)
class ClassRuntime:
    """The class's runtime as the gate measures it; `python` None: it cannot run on this host."""

    name: str  # the wheel, e.g. onnxruntime-openvino
    version: str
    providers: tuple[str, ...]  # the class's execution providers, in order
    # Per model precision, the provider lists to try in order (e.g. OpenVINO's GPU device, then its
    # CPU device), each with its provider options; every precision lists the same devices.
    attempts: dict[str, tuple[tuple[Provider, ...], ...]] = field(default_factory=dict)
    python: Path | None = None
    container: Container | None = None  # instead of `python`: the runtime in an image of the class's ISA
    unavailable: str | None = None  # why it is not measured here

    @property
    def runnable(self) -> bool:
        return self.python is not None or self.container is not None

    @property
    def title(self) -> str:
        return f"{self.name} {self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "providers": list(self.providers)}


@dataclass
class Measurement:
    """What the worker measured under the class's runtime."""

    label: str  # e.g. OpenVINOExecutionProvider(CPU)
    outputs: dict[str, dict[str, list[np.ndarray]]]  # candidate -> output name -> one array per sample
    figures: dict[str, dict[str, Any]]  # name -> load_ms, p50_ms, p95_ms (or error)
    info: dict[str, Any] = field(default_factory=dict)  # for report.runtime
    note: str | None = None  # the class's EP or device was not what ran
    # candidate -> output name -> one array per golden sample, batched as the device's check runs them
    golden: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)


def provider_label(providers: Sequence[str], options: dict[str, dict[str, str]]) -> str:
    """The provider that ran, with the OpenVINO device it ran on: "OpenVINOExecutionProvider(CPU)"."""
    first = providers[0] if providers else CPU
    device = options.get(first, {}).get("device_type")
    return f"{first}({device})" if first == OPENVINO and device else first


def finalize_note(runtime: ClassRuntime, result: dict[str, Any]) -> str | None:
    """Say so when what ran is not what the class runs on its device."""
    ran = (result.get("providers") or [CPU])[0]
    wanted = runtime.providers[0] if runtime.providers else CPU
    if ran != wanted:
        return (f"measured on {ran}: the class's {wanted} is not available on this host "
                f"({runtime.title} offers: {', '.join(result.get('available', []))})")
    tried = result.get("attempts", [])
    failed = [a for a, error in tried if error]
    if failed and wanted == OPENVINO:
        first = _device(failed[0])
        used = result.get("provider_options", {}).get(OPENVINO, {}).get("device_type", "?")
        return f"OpenVINO device {first} is not available on this host: measured on its {used} device"
    return None


def _device(attempt: Sequence[Any]) -> str:
    for p in attempt:
        if isinstance(p, list | tuple) and p[0] == OPENVINO:
            return str(p[1].get("device_type", "?"))
    return "?"


def measure_class_runtime(runtime: ClassRuntime, candidates: Sequence[tuple[str, str, Path]], data: Any,
                          sig: Any, *, graph_level: str, latency_runs: int, golden: Any = None) -> Measurement:
    """Run the worker with the runtime's python over (name, precision, file) (FP32 first).

    `data` (builder.model.data.Dataset) goes over as one feed per sample; the outputs come back
    per candidate as {output name: [one array per sample]}. `golden` (a Dataset: the golden samples)
    is run again as the device's health check runs it (one batch, as builder.model.validate.predict
    does), since a dynamically quantized model's outputs depend on the batch it is in.
    ModelError when the worker fails."""
    from builder.model.data import batched
    from builder.model.validate import PREDICT_BATCH

    assert runtime.runnable
    with tempfile.TemporaryDirectory(prefix="kiln-runtime-") as tmp:
        work = Path(tmp).absolute()
        feeds = list(batched(sig, data, 256))
        arrays = {f"{i}:{name}": v for i, (feed, _) in enumerate(feeds) for name, v in feed.items()}
        np.savez(work / "inputs.npz", **arrays)  # type: ignore[arg-type]
        request = {
            "candidates": [{"name": n, "precision": pr, "path": str(p)} for n, pr, p in candidates],
            "inputs": str(work / "inputs.npz"), "feeds": len(feeds), "rows": [n for _, n in feeds],
            "input_names": [t.name for t in sig.inputs], "output_names": sig.output_names,
            "latency_samples": [i for i in range(min(latency_runs, len(data)))],
            "array_form": data.x is not None, "batch": sig.batch,
            "graph_level": graph_level, "latency_runs": latency_runs,
            "warmup_runs": WARMUP_RUNS,
            "attempts": {pr: [list(a) for a in tries] for pr, tries in runtime.attempts.items()},
            "result": str(work / "result.json"), "outputs": str(work / "outputs.npz"),
        }
        if golden is not None:
            gfeeds = list(batched(sig, golden, PREDICT_BATCH))
            garrays = {f"{i}:{name}": v for i, (feed, _) in enumerate(gfeeds) for name, v in feed.items()}
            np.savez(work / "golden-inputs.npz", **garrays)  # type: ignore[arg-type]
            request["golden"] = {"inputs": str(work / "golden-inputs.npz"), "feeds": len(gfeeds),
                                 "rows": [n for _, n in gfeeds], "outputs": str(work / "golden-outputs.npz")}
        (work / "request.json").write_text(json.dumps(request, indent=2))
        if runtime.container is not None:
            c = runtime.container
            python = c.argv([WORKER.parent, *(p.parent for _, _, p in candidates)], work)
            env = c.env
        else:
            python, env = [str(runtime.python)], {}
        try:
            run([*python, "-I", WORKER, work / "request.json"], capture=True, timeout=TIMEOUT_S, env=env)
        except CommandFailed as exc:
            raise ModelError(f"measuring the candidates under {runtime.title}: {exc}") from None
        result = json.loads((work / "result.json").read_text())
        outputs = _read_outputs(work / "outputs.npz")
        golden_outputs = _read_outputs(work / "golden-outputs.npz") if golden is not None else {}
    label = provider_label(result.get("providers", []), result.get("provider_options", {}))
    info = {**runtime.to_dict(), "measured_with": label, "onnxruntime": result.get("onnxruntime"),
            "isa": result.get("machine"),
            "emulated": bool(runtime.container and runtime.container.emulated),
            "session_providers": result.get("providers"),
            "provider_options": _shown_options(result.get("provider_options", {})),
            "attempts": result.get("attempts", [])}
    return Measurement(label, outputs, result["candidates"], info, finalize_note(runtime, result), golden_outputs)


def _read_outputs(path: Path) -> dict[str, dict[str, list[np.ndarray]]]:
    """The worker's NPZ ("CANDIDATE:I:OUTPUT") as candidate -> output -> one array per sample, in order."""
    outputs: dict[str, dict[str, list[np.ndarray]]] = {}
    with np.load(path) as npz:
        for key in sorted(npz.files, key=_key_order):
            cand, _index, name = key.split(":", 2)
            outputs.setdefault(cand, {}).setdefault(name, []).append(npz[key])
    return outputs


def _key_order(key: str) -> tuple[str, int, str]:
    cand, index, name = key.split(":", 2)
    return cand, int(index), name


def _shown_options(options: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The options that matter (OpenVINO's device and precision hint), not every default."""
    keep = ("device_type", "precision", "num_of_threads")
    return {p: {k: o[k] for k in keep if k in o} for p, o in options.items() if p != CPU}


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
