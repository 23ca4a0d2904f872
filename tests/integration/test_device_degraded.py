"""Degraded modes for real: the inference service and the golden check of a GPU class on a machine
without its accelerator, and the GPU shared by several workers.

The host's onnxruntime is the CPU build: a class asking for CUDAExecutionProvider really falls back
to the CPU here, the same missing accelerator a GPU image sees in a QEMU VM. The trees are laid
out as in test_device_inference (make_rootfs), with a GPU class's release.json.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kiln_device import contract
from tests.integration.test_device_inference import (  # noqa: F401 - artifacts is a fixture
    LAUNCHER,
    artifacts,
    golden,
    health,
    http,
    make_rootfs,
    read_json,
    start_service,
)

pytestmark = pytest.mark.integration

ACCELERATOR = contract.ACCELERATOR_STATE.lstrip("/")
RESULT = contract.HEALTH_RESULT.lstrip("/")
MISSING = "CUDAExecutionProvider unavailable: not in this onnxruntime"


def gpu_class(root: Path, *, policy: str, degraded_p95: float | None = 50.0, envelope: float = 1e-6,
              sharing: dict[str, Any] | None = None) -> Path:
    """The tree's release.json as a GPU class's: CUDA first, a class envelope no CPU meets."""
    path = root / "usr/lib/kiln/release.json"
    release = json.loads(path.read_text())
    release.update(accelerator="nvidia-dgpu", p95LatencyMs=envelope,
                   runtime={"name": "onnxruntime-gpu", "version": "1.20.0",
                            "executionProviders": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
                   fallback={"policy": policy, "p95LatencyMs": degraded_p95 if policy == "degrade" else None},
                   sharing=sharing or {"strategy": "none", "replicas": 1})
    path.write_text(json.dumps(release, indent=2))
    return root


@pytest.fixture
def degrade(tmp_path: Path, artifacts: Path) -> Path:  # noqa: F811
    return gpu_class(make_rootfs(tmp_path / "root", artifacts), policy="degrade")


@pytest.fixture
def fail(tmp_path: Path, artifacts: Path) -> Path:  # noqa: F811
    return gpu_class(make_rootfs(tmp_path / "root", artifacts), policy="fail")


def serve(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(root / "usr/lib/kiln/venv/bin/python"), "-I", str(root / LAUNCHER), "kiln-inference",
                           "--root", str(root), "--port", "0"], capture_output=True, text=True, timeout=60)


def test_degrade_serves_on_the_cpu_and_says_why(degrade: Path) -> None:
    g = golden(degrade)
    with start_service(degrade) as svc:
        code, listing = http(f"{svc.url}/healthz")
        assert code == 200 and listing["degraded"] is True
        assert listing["degraded_reason"].startswith(MISSING)
        assert listing["degraded_reason"].endswith("; running on CPUExecutionProvider")
        assert listing["models"][0]["providers"] == ["CPUExecutionProvider"]
        code, out = http(f"{svc.url}/v1/models/digits/infer", {"inputs": g["x"][:4].tolist()})
        assert code == 200 and out["argmax"] == g["outputs"][:4].argmax(axis=1).tolist()
        state = read_json(degrade / ACCELERATOR)
        assert state["degraded"] is True and state["degraded_reason"] == listing["degraded_reason"]
        assert state["policy"] == "degrade" and state["accelerated"] == "CUDAExecutionProvider"
        assert state["running"] == {"digits": "CPUExecutionProvider"}
        assert read_json(svc.status)["degraded_reason"] == listing["degraded_reason"]

        code, result, err = health(degrade, "--service", svc.url)
    assert code == 0, err
    assert result["healthy"] and result["status"] == "degraded" and result["problems"] == []
    assert result["degraded"] is True and result["degraded_reason"].startswith(MISSING)
    # held to the degraded envelope (50 ms), not the class's 1e-6 ms no CPU meets
    assert result["envelope_p95_ms"] == 50.0
    assert result["models"][0]["latency"]["envelope"] == "degraded"
    assert result["models"][0]["latency"]["envelope_p95_ms"] == 50.0
    assert read_json(degrade / RESULT) == result  # what kiln-agent status reads
    assert f"degraded: {MISSING}" in err and "degraded (exit 0" in err
    assert "degraded envelope 50 ms" in err


def test_degrade_still_holds_the_degraded_envelope(tmp_path: Path, artifacts: Path) -> None:  # noqa: F811
    root = gpu_class(make_rootfs(tmp_path / "root", artifacts), policy="degrade", degraded_p95=1e-6)
    code, result, err = health(root)
    assert code == 2, err
    assert "over the degraded envelope 1e-06 ms" in result["problems"][0]["message"]
    assert result["degraded"] is True


def test_fail_refuses_to_serve_and_fails_the_check(fail: Path) -> None:
    r = serve(fail)
    assert r.returncode == 4, r.stderr
    assert MISSING in r.stderr and "the class's fallback policy is fail" in r.stderr
    assert "Traceback" not in r.stderr
    state = read_json(fail / ACCELERATOR)
    assert state["degraded"] is False and state["policy"] == "fail" and MISSING in state["failed"]
    assert read_json(fail / "var/lib/kiln/inference/status.json")["ready"] is False

    code, result, err = health(fail)
    assert code == 5, err
    assert result["status"] == "accelerator-unavailable" and not result["healthy"] and not result["degraded"]
    problem = result["problems"][0]
    assert [p["code"] for p in result["problems"]] == [5, 2]  # and the CPU is over the class's envelope
    assert MISSING in problem["message"] and "fallback policy is fail" in problem["message"]
    assert "FAIL (5 accelerator-unavailable)" in err


def test_the_check_does_not_wait_for_a_service_that_gave_up_this_boot(fail: Path) -> None:
    """Found on the Jetson stand-in's boot: under policy fail the service exits 4 at once, and the golden
    check waited out its whole --wait (180 s at boot) for it before failing. It stops waiting as soon as
    the service has recorded, in this boot, that it will not serve."""
    boot_id = fail / contract.BOOT_ID.lstrip("/")
    boot_id.parent.mkdir(parents=True, exist_ok=True)
    boot_id.write_text("3f1c2a9e-5b7d-4e21-9a0f-1d2c3b4a5e6f\n")
    assert serve(fail).returncode == 4
    assert read_json(fail / ACCELERATOR)["boot_id"] == "3f1c2a9e-5b7d-4e21-9a0f-1d2c3b4a5e6f"
    closed = "http://127.0.0.1:9"  # discard: nothing answers
    code, result, err = health(fail, "--service", closed, "--wait", "600")  # helper's timeout: 60 s
    assert code == 5, err
    service = [p for p in result["problems"] if p["code"] == 4]
    assert len(service) == 1 and "will not serve this boot" in service[0]["message"], result["problems"]
    assert MISSING in service[0]["message"]
    # the record of another boot is no reason to give up: the check waits for the service as long as told
    boot_id.write_text("0e2d4c6b-8a9f-4b1d-8c3e-5f7a9b1c3d5e\n")
    code, result, err = health(fail, "--service", closed, "--wait", "1")
    service = [p for p in result["problems"] if p["code"] == 4]
    assert len(service) == 1 and "will not serve" not in service[0]["message"], result["problems"]


def test_a_cpu_class_is_never_degraded(tmp_path: Path, artifacts: Path) -> None:  # noqa: F811
    root = make_rootfs(tmp_path / "root", artifacts)
    code, result, err = health(root)
    assert code == 0 and result["status"] == "healthy" and result["degraded"] is False, err


def test_time_slicing_replicas_are_workers_taking_requests_in_turn(tmp_path: Path, artifacts: Path) -> None:  # noqa: F811
    root = gpu_class(make_rootfs(tmp_path / "root", artifacts), policy="degrade",
                     sharing={"strategy": "time-slicing", "replicas": 3})
    g = golden(root)
    with start_service(root) as svc:
        for i in range(6):
            code, out = http(f"{svc.url}/v1/models/digits/infer", {"inputs": g["x"][i:i + 1].tolist()})
            assert code == 200 and out["argmax"] == [int(g["outputs"][i].argmax())]
        code, listing = http(f"{svc.url}/healthz")
        (model,) = listing["models"]
        assert model["workers"] == 3 and model["served_by_worker"] == [2, 2, 2]
        assert listing["sharing"] == "time-slicing: 3 workers share the GPU"
        status = read_json(svc.status)
        assert status["workers"] == 3 and status["sharing"] == listing["sharing"]
        assert read_json(root / ACCELERATOR)["workers"] == 3


@pytest.mark.parametrize(("model_limits", "class_fallback", "expected"), [
    ({"p95LatencyMs": 1e-6, "fallbackP95LatencyMs": 40.0}, 50.0, 40.0),  # the model's own fallback figure
    ({"p95LatencyMs": 1e-6}, 50.0, 50.0),  # then the class's fallback, not the model's accelerator figure
    ({"p95LatencyMs": 45.0}, None, 45.0),  # then the model's own envelope
])
def test_degraded_envelope_of_a_model_with_its_own(tmp_path: Path, artifacts: Path, model_limits: dict[str, float],  # noqa: F811
                                                    class_fallback: float | None, expected: float) -> None:
    """A model with its own envelope on the CPU fallback: its fallbackP95LatencyMs, else the class's
    fallback envelope, else its own p95LatencyMs (found in review: the accelerator figure came first)."""
    root = gpu_class(make_rootfs(tmp_path / "root", artifacts), policy="degrade", degraded_p95=class_fallback)
    path = root / "usr/lib/kiln/release.json"
    release = json.loads(path.read_text())
    release["models"][0].update(model_limits)
    path.write_text(json.dumps(release))
    code, result, err = health(root)
    assert code == 0, err
    latency = result["models"][0]["latency"]
    assert (latency["envelope"], latency["envelope_p95_ms"]) == ("degraded", expected)
