"""The accel tier: the accelerator classes built for real here, and booted in QEMU (which has no GPU).

Heavy (a DKMS build of the NVIDIA modules, about 2 GB of CUDA 12 wheels, two more Debian bases,
a 4 GB root filesystem booted under TCG), so it is not part of `scripts/test`: run it with
`scripts/test-accel` (README). The classes are production classes, as shipped: signed with a
release key made for the session, no SSH and no guest agent. What a booted device decided is
read twice: its verdict lines on the serial console while it runs, and its result files from
the powered-off disk's data partition (debugfs, no mount).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.disk import assemble, vm
from builder.disk.assemble import open_rootfs
from kiln_device import lint
from tests.accel.conftest import BOOT_TIMEOUT, HEALTHY, UNHEALTHY, read_var
from tests.conftest import require_tool
from tests.images import kiln_test_context, kiln_test_state

pytestmark = pytest.mark.accel

@pytest.fixture(scope="session")
def gpu_rootfs(gpu_build: dict[str, Any]) -> Iterator[Path]:
    with open_rootfs(gpu_build["image"]["ref"], kiln_test_state().engine_env()) as root:
        yield root


# --- the GPU image as built ------------------------------------------------------------------


def test_gpu_build_records_what_is_inside(gpu_build: dict[str, Any]) -> None:
    contents = gpu_build["contents"]
    kernel = contents["kernel"]
    assert re.fullmatch(r"6\.1\.0-\d+-amd64", kernel or ""), contents
    assert contents["driver"]["name"] == "nvidia" and contents["driver"]["version"].startswith("535.")
    assert contents["driver"]["builtFor"] == kernel
    assert contents["toolkit"] == "absent" and contents["cdi"]["generator"] == "kiln-cdi"
    assert contents["runtime"]["name"] == "onnxruntime-gpu" and contents["runtime"]["cudaMajor"] == 12
    assert contents["runtime"]["executionProviders"][-1] == "CPUExecutionProvider"
    labels = gpu_build["labels"]
    assert labels["dev.kiln.toolkit"] == "absent"
    assert labels["dev.kiln.driver"] == f"nvidia={contents['driver']['version']}"
    assert {layer["group"] for layer in gpu_build["layers"]} >= {"os", "drivers", "kernel", "runtime", "model"}
    assert "unknown" not in {layer["group"] for layer in gpu_build["layers"]}


def test_gpu_modules_match_the_image_kernel_and_no_build_tools_remain(gpu_build: dict[str, Any],
                                                                       gpu_rootfs: Path) -> None:
    kernel = gpu_build["contents"]["kernel"]
    modules = sorted((gpu_rootfs / "usr/lib/modules" / kernel / "updates/dkms").glob("nvidia*.ko"))
    assert {m.name for m in modules} >= {"nvidia-current.ko", "nvidia-current-uvm.ko"}, modules
    info = lint.modinfo(modules[0])
    assert info["vermagic"].split()[0] == kernel
    for gone in ("usr/bin/gcc", "usr/bin/cc", "usr/sbin/dkms", "var/lib/dkms", f"usr/src/linux-headers-{kernel}"):
        assert not (gpu_rootfs / gone).exists(), gone
    # The same lints the build's last step ran, on the same bytes: nothing to report.
    findings = lint.run_lints(gpu_rootfs, {"nvidia-vermagic", "nvidia-userspace-version", "cuda-driver-branch",
                                           "no-build-tools"})
    assert findings == []


# --- booting the production images in QEMU (no GPU, no iGPU) ---------------------------------------


@dataclass(frozen=True)
class Booted:
    console: str
    files: dict[str, Any]


def boot(build: dict[str, Any], tmp: Path, *, memory_mib: int, files: tuple[str, ...]) -> Booted:
    for tool in ("qemu-system-x86_64", "mkfs.erofs", "mkfs.ext4", "mkfs.vfat", "mcopy", "sfdisk", "debugfs"):
        require_tool(tool)
    image = tmp / "disk.raw"
    assemble.make_disk(kiln_test_context(), build["image"]["ref"], output=image, version=build["version"])
    try:
        cfg = vm.VMConfig(disk=image, memory_mib=memory_mib, workdir=tmp / "vm")
        with vm.start_vm(cfg) as machine:
            machine.wait_for_console(HEALTHY, BOOT_TIMEOUT, fail=UNHEALTHY)
            console = machine.console_text()
            machine.poweroff()
        return Booted(console, {rel: read_var(image, rel) for rel in files})
    finally:
        image.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def gpu_booted(gpu_build: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Booted:
    return boot(gpu_build, tmp_path_factory.mktemp("gpu-boot"), memory_mib=6144,
                files=("lib/kiln/health/inference.json", "lib/kiln/health/gpu.json",
                       "lib/kiln/inference/accelerator.json"))


@pytest.fixture(scope="session")
def intel_booted(intel_build: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Booted:
    return boot(intel_build, tmp_path_factory.mktemp("intel-boot"), memory_mib=2048,
                files=("lib/kiln/health/inference.json", "lib/kiln/inference/accelerator.json"))


def test_gpu_image_comes_up_healthy_degraded_to_cpu(gpu_booted: Booted) -> None:
    """The class's fallback policy is degrade: no GPU in QEMU, so inference runs on the CPU, the
    checks pass and say degraded, with the reason."""
    console, files = gpu_booted.console, gpu_booted.files
    assert re.search(r"kiln-health-gpu: degraded: no GPU visible", console), console[-3000:]
    assert re.search(r"kiln-health-inference: degraded \(exit 0", console)
    gpu = files["lib/kiln/health/gpu.json"]
    assert gpu["status"] == "degraded" and gpu["degraded_reason"].startswith("no GPU visible")
    health = files["lib/kiln/health/inference.json"]
    assert health["status"] == "degraded" and health["exit_code"] == 0
    acc = files["lib/kiln/inference/accelerator.json"]
    assert acc["degraded"] is True and acc["policy"] == "degrade"
    assert acc["accelerated"] == "CUDAExecutionProvider"
    assert set(acc["running"].values()) == {"CPUExecutionProvider"}


def test_openvino_runs_the_detector_model_in_the_booted_image(intel_booted: Booted) -> None:
    """No iGPU in QEMU: the class degrades to OpenVINO's CPU device, and the golden check passes
    through the OpenVINO execution provider."""
    health = intel_booted.files["lib/kiln/health/inference.json"]
    assert health["exit_code"] == 0, intel_booted.console[-3000:]
    [model] = health["models"]
    assert model["providers"][0] == "OpenVINOExecutionProvider", model
    assert model["openvino"]["device_type"] == "CPU"
    assert model["local"]["ok"] is True
