"""Degraded modes and the GPU on the device: fallback policy, gpu-visible, the CDI generator,
worker counts, and `kiln-agent status` saying degraded. Fake /dev, /sys, /proc and lib trees in tmp_path."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from builder.image.render import finalize_plan, make_context
from builder.spec.loader import load_class
from kiln_device import cdi, contract, degraded, gpu
from kiln_device.contract import ACCELERATOR_STATE, GPU_HEALTH_RESULT, HEALTH_RESULT, under

ROOT = Path(__file__).resolve().parents[2]
LIB = "usr/lib/x86_64-linux-gnu"
DRIVER = "535.309.01"


def release(root: Path, *, accelerator: str = "nvidia-dgpu", policy: str | None = "degrade") -> Path:
    path = under(root, "/usr/lib/kiln/release.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    fallback = None if policy is None else {"policy": policy, "p95LatencyMs": 50 if policy == "degrade" else None}
    path.write_text(json.dumps({"class": "gpu", "compatible": "kiln,gpu", "version": "1.0.0",
                                "accelerator": accelerator, "fallback": fallback,
                                "runtime": {"name": "onnxruntime-gpu", "version": "1.20.0",
                                            "executionProviders": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
                                "p95LatencyMs": 5}))
    return root


def touch(root: Path, *paths: str) -> None:
    for p in paths:
        f = root / p.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("")


def fake_gpu(root: Path, gpus: int = 2) -> Path:
    """What a booted NVIDIA dGPU device shows: module, nodes, driver libraries (Debian's layout)."""
    (root / "sys/module/nvidia").mkdir(parents=True)
    version = root / "proc/driver/nvidia/version"
    version.parent.mkdir(parents=True)
    version.write_text(f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {DRIVER}  Release Build\nGCC version: 12\n")
    touch(root, "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset",
          *(f"/dev/nvidia{i}" for i in range(gpus)))
    current = root / LIB / "nvidia/current"
    current.mkdir(parents=True)
    for name in (f"libcuda.so.{DRIVER}", f"libnvidia-ml.so.{DRIVER}", f"libnvidia-ptxjitcompiler.so.{DRIVER}"):
        (current / name).write_text("")
    os.symlink(f"libcuda.so.{DRIVER}", current / "libcuda.so.1")  # a link inside: not mounted twice
    alternatives = root / "etc/alternatives"
    alternatives.mkdir(parents=True)
    os.symlink(f"/{LIB}/nvidia/current/libcuda.so.1", alternatives / "libcuda.so.1-x86_64-linux-gnu")
    os.symlink("/etc/alternatives/libcuda.so.1-x86_64-linux-gnu", root / LIB / "libcuda.so.1")  # absolute links
    (root / LIB / "libc.so.6").write_text("")  # not the driver's
    smi = root / "usr/lib/nvidia/current/nvidia-smi"
    smi.parent.mkdir(parents=True)
    smi.write_text("")
    (root / "usr/bin").mkdir(parents=True)
    os.symlink("/usr/lib/nvidia/current/nvidia-smi", root / "usr/bin/nvidia-smi")
    return root


# --- the fallback policy ------------------------------------------------------------------------


def fallback_of(**fields: object) -> degraded.Fallback:
    base = {"class": "gpu", "compatible": "kiln,gpu", "version": "1.0.0"}
    return degraded.parse_fallback(contract.parse_release({**base, **fields}))


def test_parse_fallback() -> None:
    assert fallback_of(fallback={"policy": "degrade", "p95LatencyMs": 40}) == degraded.Fallback("degrade", 40.0)
    assert fallback_of(fallback={"policy": "fail", "p95LatencyMs": None}).policy == "fail"
    # a release.json from before degraded modes: degrade where the class lists the CPU provider
    runtime = {"name": "onnxruntime-gpu", "version": "1.20.0"}
    assert fallback_of(runtime={**runtime, "executionProviders": ["CUDAExecutionProvider",
                                                                  "CPUExecutionProvider"]}).degrades
    assert not fallback_of(runtime={**runtime, "executionProviders": ["CUDAExecutionProvider"]}).degrades
    for bad, where in (({"policy": "ignore"}, "fallback.policy"), ({"policy": "degrade", "p95LatencyMs": -1},
                                                                   "fallback.p95LatencyMs"), ("degrade", "fallback")):
        with pytest.raises(ValueError, match=rf"^release\.json: {re.escape(where)}: "):
            fallback_of(fallback=bad)


def test_release_json_carries_fallback_sharing_and_the_preset(tmp_path: Path) -> None:
    for name, fallback, gpu_check in (("factory-gateway-gpu", {"policy": "degrade", "p95LatencyMs": 50.0}, True),
                                      ("jetson-vision-standard", {"policy": "fail", "p95LatencyMs": None}, True),
                                      ("intel-lowpower-detector", {"policy": "degrade", "p95LatencyMs": 50.0}, False),
                                      ("qemu-x86_64", None, False)):
        plan = finalize_plan(load_class(name, ROOT / "images"), source=f"images/{name}.yaml")
        assert contract.release_json(plan.release)["fallback"] == fallback, name
        ctx = make_context(plan, tmp_path / name)
        preset = (ctx / "class/usr/lib/systemd/system-preset/70-kiln-class.preset").read_text()
        assert f"{'enable' if gpu_check else 'disable'} kiln-health-gpu.service" in preset, name
    gateway = finalize_plan(load_class("factory-gateway-gpu", ROOT / "images"), source="x").release
    assert gateway is not None and gateway.sharing == contract.Sharing(strategy="time-slicing", replicas=4)


# --- gpu-visible --------------------------------------------------------------------------------


def test_gpu_visible_on_a_device_with_its_gpu(tmp_path: Path) -> None:
    root = release(fake_gpu(tmp_path))
    result = gpu.run_check(root)
    assert result["exit_code"] == 0 and result["status"] == "visible" and not result["degraded"]
    assert result["devices"] == ["/dev/nvidia0", "/dev/nvidia1"] and result["driver_version"] == DRIVER


@pytest.mark.parametrize("policy, code, status", [("degrade", 0, "degraded"), ("fail", 1, "gpu-missing")])
def test_gpu_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str, code: int,
                     status: str) -> None:
    root = release(tmp_path, policy=policy)
    assert gpu.main(["--root", str(root)]) == code
    err = capsys.readouterr().err
    result = json.loads(under(root, GPU_HEALTH_RESULT).read_text())
    assert result["status"] == status and result["visible"] is False
    assert "the nvidia kernel module is not loaded" in " ".join(result["missing"])
    assert "/dev/nvidiactl is missing" in " ".join(result["missing"])
    if policy == "degrade":
        assert result["degraded"] and "no GPU visible" in result["degraded_reason"]
        assert "degraded: no GPU visible" in err
    else:
        assert not result["degraded"] and "fallback policy is fail" in result["problem"]
        assert "FAIL: no GPU visible" in err


def test_gpu_module_without_nodes_is_not_visible(tmp_path: Path) -> None:
    root = release(tmp_path, policy="fail")
    (root / "sys/module/nvidia").mkdir(parents=True)
    result = gpu.run_check(root)
    assert result["exit_code"] == 1 and result["missing"] == ["/dev/nvidiactl is missing",
                                                              "no /dev/nvidiaN device node"]


def test_gpu_check_on_jetson_and_cpu_classes(tmp_path: Path) -> None:
    jetson = release(tmp_path / "jetson", accelerator="nvidia-jetson", policy="fail")
    assert gpu.run_check(jetson)["exit_code"] == 1
    (jetson / "sys/module/nvgpu").mkdir(parents=True)
    touch(jetson, "/dev/nvhost-ctrl-gpu")
    assert gpu.run_check(jetson)["status"] == "visible"
    cpu = release(tmp_path / "cpu", accelerator="none", policy=None)
    assert gpu.run_check(cpu)["status"] == "not-applicable"
    assert gpu.run_check(tmp_path / "empty")["exit_code"] == 3  # no release.json


# --- CDI ----------------------------------------------------------------------------------------


def test_cdi_spec_for_the_gpus_found(tmp_path: Path) -> None:
    root = fake_gpu(tmp_path / "root")
    spec_path, status_path = tmp_path / "run/cdi/nvidia.json", tmp_path / "run/kiln/cdi.json"
    record = cdi.make_spec(root, spec_path, status_path, "x86_64-linux-gnu")
    spec = json.loads(spec_path.read_text())
    assert spec["cdiVersion"] == "0.6.0" and spec["kind"] == "nvidia.com/gpu"
    assert [d["name"] for d in spec["devices"]] == ["0", "1", "all"]
    assert spec["devices"][1]["containerEdits"]["deviceNodes"] == [{"path": "/dev/nvidia1"}]
    assert spec["devices"][2]["containerEdits"]["deviceNodes"] == [{"path": "/dev/nvidia0"}, {"path": "/dev/nvidia1"}]
    edits = spec["containerEdits"]
    assert [n["path"] for n in edits["deviceNodes"]] == list(cdi.CONTROL_NODES)
    mounts = {m["containerPath"]: m["hostPath"] for m in edits["mounts"]}
    current = f"/{LIB}/nvidia/current"
    assert mounts == {
        f"{current}/libcuda.so.{DRIVER}": f"{current}/libcuda.so.{DRIVER}",
        f"{current}/libnvidia-ml.so.{DRIVER}": f"{current}/libnvidia-ml.so.{DRIVER}",
        f"{current}/libnvidia-ptxjitcompiler.so.{DRIVER}": f"{current}/libnvidia-ptxjitcompiler.so.{DRIVER}",
        f"/{LIB}/libcuda.so.1": f"{current}/libcuda.so.{DRIVER}",  # through /etc/alternatives, inside the root
        "/usr/bin/nvidia-smi": "/usr/lib/nvidia/current/nvidia-smi",
    }
    assert all(m["options"] == ["ro", "nosuid", "nodev", "bind"] for m in edits["mounts"])
    assert record["written"] and record["driver_version"] == DRIVER
    assert json.loads(status_path.read_text())["devices"] == ["0", "1", "all"]


def test_cdi_without_a_gpu_writes_no_spec_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    touch(root, "/run/cdi/nvidia.json")  # last boot's, stale
    assert cdi.main(["--root", str(root)]) == 0
    assert not (root / "run/cdi/nvidia.json").exists()
    record = json.loads((root / "run/kiln/cdi.json").read_text())
    assert record["written"] is False and "no /dev/nvidiaN" in record["reason"]
    assert "no CDI spec: no /dev/nvidiaN" in capsys.readouterr().err


# --- workers sharing the GPU ---------------------------------------------------------------------


@pytest.mark.parametrize("sharing, workers, note", [
    ({"strategy": "time-slicing", "replicas": 4}, 4, "time-slicing: 4 workers share the GPU"),
    ({"strategy": "mps", "replicas": 2}, 2, "MPS: 2 workers"),
    ({"strategy": "none", "replicas": 1}, 1, "no GPU sharing: 1 worker"),
    (None, 1, "no GPU sharing"),
])
def test_worker_count(sharing: dict[str, object] | None, workers: int, note: str) -> None:
    from kiln_device.server import worker_count

    n, text = worker_count(contract.parse_release({"class": "gpu", "compatible": "kiln,gpu", "version": "1.0.0",
                                                   "sharing": sharing}))
    assert n == workers and note in text


def test_worker_count_refuses_nonsense(tmp_path: Path) -> None:
    from kiln_device.inference import ModelProblem, load_release
    from kiln_device.server import worker_count

    for sharing, where in (({"strategy": "time-slicing", "replicas": 0}, "sharing.replicas"),
                           ({"strategy": "magic", "replicas": 2}, "sharing.strategy")):
        under(tmp_path, contract.RELEASE_JSON).parent.mkdir(parents=True, exist_ok=True)
        under(tmp_path, contract.RELEASE_JSON).write_text(json.dumps(
            {"class": "gpu", "compatible": "kiln,gpu", "version": "1.0.0", "sharing": sharing}))
        with pytest.raises(ModelProblem, match=rf"^/usr/lib/kiln/release\.json: {where}: "):
            worker_count(load_release(tmp_path))
    hand_made = contract.Release(cls="gpu", compatible="kiln,gpu", version="1.0.0",
                                 sharing=contract.Sharing(strategy="time-slicing", replicas=65))
    with pytest.raises(ModelProblem, match=r"sharing\.replicas"):
        worker_count(hand_made)


# --- kiln-agent status ----------------------------------------------------------------------------


def test_agent_status_says_degraded_for_this_boot_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from kiln_device.agent import cli
    from tests.unit.test_agent import agent_config

    monkeypatch.setenv("KILN_AGENT_ROOT", str(tmp_path))
    config = str(agent_config(tmp_path))  # boot id "boot-1"
    assert cli.main(["--config", config, "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["degraded"] is None
    reason = "CUDAExecutionProvider unavailable: no GPU visible; running on CPUExecutionProvider"
    for path, boot, text in ((ACCELERATOR_STATE, "boot-1", reason), (HEALTH_RESULT, "boot-1", reason),
                             (GPU_HEALTH_RESULT, "boot-0", "an earlier boot's")):
        under(tmp_path, path).parent.mkdir(parents=True, exist_ok=True)
        under(tmp_path, path).write_text(json.dumps({"degraded": True, "degraded_reason": text, "boot_id": boot}))
    assert cli.main(["--config", config, "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["degraded"] == reason and data["degradedSources"] == [ACCELERATOR_STATE, HEALTH_RESULT]
    assert cli.main(["--config", config, "status"]) == 0
    assert f"degraded: {reason}" in capsys.readouterr().out.splitlines()


def test_agent_status_reports_this_boot_s_health_check_and_the_root_mount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln demo` prints what the device says of itself: nothing on the host parses guest text."""
    from kiln_device.agent import cli
    from tests.unit.test_agent import agent_config

    monkeypatch.setenv("KILN_AGENT_ROOT", str(tmp_path))
    config = str(agent_config(tmp_path))  # boot id "boot-1"
    mounts = under(tmp_path, "/proc/self/mounts")
    mounts.parent.mkdir(parents=True, exist_ok=True)
    mounts.write_text("rootfs / rootfs rw 0 0\n/dev/vda2 / erofs ro,relatime,user_xattr 0 0\n"
                      "overlay /etc overlay rw,relatime 0 0\n")
    health = under(tmp_path, HEALTH_RESULT)
    health.parent.mkdir(parents=True, exist_ok=True)
    health.write_text(json.dumps({"status": "healthy", "exit_code": 0, "boot_id": "boot-0",
                                  "models": [{"name": "digits"}], "checked_at": "2026-12-06T06:00:00+00:00"}))
    assert cli.main(["--config", config, "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["root"] == {"fstype": "erofs", "readOnly": True}  # the last mount of / is the one in effect
    assert data["health"] is None  # an earlier boot's result says nothing of this one
    health.write_text(json.dumps({"status": "accelerator-unavailable", "exit_code": 5, "boot_id": "boot-1",
                                  "models": [{"name": "digits"}], "checked_at": "2026-12-06T06:10:00+00:00"}))
    assert cli.main(["--config", config, "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["health"] == {"status": "accelerator-unavailable", "exitCode": 5, "models": ["digits"],
                              "checkedAt": "2026-12-06T06:10:00+00:00"}

    from builder.cli.images import summarize_device

    assert (data["secureBoot"], data["rootDigest"]) == (None, None)  # no EFI variables, no bound root here
    assert summarize_device(json.dumps(data)).splitlines()[1:4] == [
        "device: root erofs, read-only", "device: secure boot unknown; root not bound to a signed UKI",
        "golden inference check: accelerator-unavailable (exit 5, 1 model(s))"]
    assert summarize_device("sh: kiln-agent: not found").startswith("device: `kiln-agent status --json` did not")
