"""The class's own runtime: OpenVINO provider options (device side) and what the gate says it measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.model.for_class import finalize_attempts
from builder.model.gates import describe, golden
from builder.model.runtime_venv import want_runtime_venv, why_not_host_runtime
from builder.model.runtimes import ClassRuntime, finalize_note, provider_label
from builder.spec.loader import load_class
from kiln_device.contract import Runtime
from kiln_device.inference import ModelProblem, provider_options, session_providers

ROOT = Path(__file__).resolve().parents[2]
OV = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"


def release(device: str | None) -> Runtime:
    """release.json's runtime of an OpenVINO class on `device`."""
    return Runtime(name="onnxruntime-openvino", version="1.24.1", execution_providers=(OV, CPU), device=device)


@pytest.mark.parametrize(("device", "precision", "override", "want"), [
    ("GPU", "fp16", None, {"device_type": "GPU", "precision": "FP16"}),
    ("GPU", "int8", None, {"device_type": "GPU", "precision": "FP16"}),
    ("GPU", "fp32", None, {"device_type": "GPU", "precision": "FP32"}),
    ("GPU.1", "fp16", None, {"device_type": "GPU.1", "precision": "FP16"}),
    ("NPU", "fp16", None, {"device_type": "NPU", "precision": "FP16"}),
    # The CPU device: always FP32 (OpenVINO's CPU plugin would run bf16 on AMX; it refuses FP16).
    ("GPU", "fp16", "CPU", {"device_type": "CPU", "precision": "FP32", "num_of_threads": "1"}),
    ("CPU", "fp16", None, {"device_type": "CPU", "precision": "FP32", "num_of_threads": "1"}),
    (None, "fp16", None, {"device_type": "CPU", "precision": "FP32", "num_of_threads": "1"}),
])
def test_openvino_options_pin_device_and_precision(device: str | None, precision: str, override: str | None,
                                                   want: dict[str, str]) -> None:
    assert provider_options(release(device), OV, precision=precision, device=override) == want


def test_other_providers_get_no_options_and_session_providers_pairs_openvino() -> None:
    assert provider_options(release("GPU"), CPU) == {}
    assert provider_options(release("GPU"), "CUDAExecutionProvider") == {}
    assert session_providers(release("GPU"), [OV, CPU], precision="fp16") == [
        (OV, {"device_type": "GPU", "precision": "FP16"}), CPU]


def test_an_unknown_openvino_device_is_a_model_problem() -> None:
    with pytest.raises(ModelProblem, match="unknown OpenVINO device 'TPU'"):
        provider_options(release("TPU"), OV)


def test_the_gate_tries_the_class_device_then_openvinos_cpu_device() -> None:
    attempts = finalize_attempts(load_class("intel-lowpower-detector", ROOT / "images").spec.runtime)
    assert attempts["fp16"] == (
        ((OV, {"device_type": "GPU", "precision": "FP16"}), CPU),
        ((OV, {"device_type": "CPU", "precision": "FP32", "num_of_threads": "1"}), CPU),
    )
    assert attempts["fp32"][0][0] == (OV, {"device_type": "GPU", "precision": "FP32"})
    gpu = load_class("factory-gateway-gpu", ROOT / "images")
    rt = gpu.spec.runtime
    assert finalize_attempts(rt)["fp32"] == (tuple(rt.execution_providers),)  # as the class lists


def test_which_classes_get_their_runtime_measured_and_which_cannot_be_here() -> None:
    intel = load_class("intel-lowpower-detector", ROOT / "images")
    qemu = load_class("qemu-x86_64", ROOT / "images")
    jetson = load_class("jetson-vision-standard", ROOT / "images")
    assert want_runtime_venv(intel, "onnxruntime", "1.32.0")
    assert not want_runtime_venv(qemu, "onnxruntime", qemu.spec.runtime.version)
    assert want_runtime_venv(qemu, "onnxruntime", "1.0.0")  # another version is another runtime
    assert why_not_host_runtime(intel) is None
    assert "built for aarch64; this host is x86_64" in (why_not_host_runtime(jetson) or "")


def runtime(providers: tuple[str, ...]) -> ClassRuntime:
    return ClassRuntime(name="onnxruntime-gpu", version="1.31.1", providers=providers)


def test_a_silent_cpu_fallback_is_said_not_hidden() -> None:
    result = {"providers": [CPU], "available": ["CUDAExecutionProvider", CPU],
              "attempts": [[["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU], None]]}
    note = finalize_note(runtime(("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU)), result)
    assert note == ("measured on CPUExecutionProvider: the class's TensorrtExecutionProvider is not available "
                    "on this host (onnxruntime-gpu 1.31.1 offers: CUDAExecutionProvider, CPUExecutionProvider)")


def test_an_openvino_device_fallback_is_said_and_labelled() -> None:
    gpu, cpu = [[OV, {"device_type": "GPU"}], CPU], [[OV, {"device_type": "CPU"}], CPU]
    result = {"providers": [OV, CPU], "provider_options": {OV: {"device_type": "CPU"}},
              "attempts": [[gpu, "OpenVINOExecutionProvider could not be created"], [cpu, None]]}
    ov = ClassRuntime(name="onnxruntime-openvino", version="1.24.1", providers=(OV, CPU))
    assert finalize_note(ov, result) == "OpenVINO device GPU is not available on this host: measured on its CPU device"
    assert provider_label([OV, CPU], {OV: {"device_type": "CPU"}}) == "OpenVINOExecutionProvider(CPU)"
    assert provider_label([CPU], {}) == CPU
    ok = {**result, "attempts": [[gpu, None]], "provider_options": {OV: {"device_type": "GPU"}}}
    assert finalize_note(ov, ok) is None


def test_the_golden_gate_wording() -> None:
    assert describe(golden(0.02, 0.01)) == ("outputs differ from the build host's by 0.02 > the golden "
                                            "tolerance 0.01 (golden_tolerance)")
    assert golden(8.6e-06, 0.05).passed
