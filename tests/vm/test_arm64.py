"""arm64, end to end in emulated QEMU: the arm64-vision class built on this host through qemu-user,
its A/B disk booted in qemu-system-aarch64 (the virt machine, AAVMF, systemd-bootaa64), a signed
model-only update blessed on slot B, and a release whose golden check fails rolled back by itself.

1. (vm tier, CI) the factory disk: its ESP holds systemd-boot for arm64 at the fallback path and the
   kernel uncompressed (an arm64 PE image), read from the disk on the host; the booted device is
   aarch64, runs slot A from its read-only erofs root, and passes the golden inference check whose
   outputs the gate measured on arm64;
2. (arm64long tier, scripts/test-arm64) v1 -> v2, the model only: the agent writes slot B, reboots,
   and the trial boot is blessed;
3. (arm64long) v3 whose golden set is wrong: three trial boots fail their check, systemd-boot falls
   back to v2 by itself, and the agent records the rollback and never takes v3 again;
4. (arm64long) jetson-vision-standard's stand-in (the class without NVIDIA's L4T, builder.spec.stand_in)
   boots on arm64 and does what its class's fallback policy (fail) says without the Orin's GPU: the
   gpu-visible check names the missing nvgpu, the inference service refuses to serve on the CPU,
   the golden check fails as accelerator-unavailable.

The same agent, units and boot counting as qemu-x86_64 (tests/vm/test_ota.py): nothing here is
arm64's own but the machine. Emulated arm64 boots take several minutes under TCG here.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.projects import make_broken_golden_project, make_retrained_project
from builder.core import paths
from builder.core.run import run
from builder.disk import assemble, rawdisk, vm
from builder.spec.schema import Architecture
from tests.conftest import require_tool
from tests.images import ARM64_CLASS, JETSON_STAND_IN
from tests.vm.conftest import BOOT_TIMEOUT, VM_TOOLS, BuiltDisk, copy_disk
from tests.vm.otakit import Releases, agent, boot_until_healthy_on, configure, serving_releases, status

ARM64_BOOT_TIMEOUT = BOOT_TIMEOUT * vm.SLOWDOWN[Architecture.aarch64] / 2  # 30 min on a busy 2-core host
PE_MACHINE_ARM64 = 0xAA64


def pe_machine(data: bytes) -> int:
    """The COFF machine type of a PE image (EFI application or an EFI-stub kernel)."""
    assert data[:2] == b"MZ", data[:4]
    offset = struct.unpack_from("<I", data, 0x3C)[0]
    assert data[offset:offset + 4] == b"PE\0\0"
    return int(struct.unpack_from("<H", data, offset + 4)[0])


@pytest.fixture(scope="session")
def arm64_disk(tmp_path_factory: pytest.TempPathFactory) -> BuiltDisk:
    """arm64-vision built into the test store (qemu-user), and its raw disk."""
    for tool in (*VM_TOOLS[1:], "qemu-system-aarch64"):
        require_tool(tool)
    try:
        vm.find_firmware(arch=Architecture.aarch64)
    except Exception as exc:
        require_tool(f"AAVMF ({exc})")
    from tests.images import arm64_image, kiln_test_context, kiln_test_state

    state = kiln_test_state()
    build: dict[str, Any] = arm64_image(state)
    out = tmp_path_factory.mktemp("arm64-disk") / "disk.raw"
    record = assemble.make_disk(kiln_test_context(state), build["image"]["ref"], output=out, version=build["version"])
    return BuiltDisk(out, record, record.class_name, record.version, paths.ssh_key_path(ARM64_CLASS))


def esp_file(image: Path, rel: str) -> bytes:
    """A file of the disk's ESP, read with mtools at the partition's offset (nothing mounted)."""
    offset = rawdisk.partition_offset(image, "esp")
    return bytes(run(["mtype", "-i", f"{image}@@{offset}", f"::/{rel}"], capture=True, quiet=True,
                     env={"MTOOLS_SKIP_CHECK": "1"}).stdout)


@pytest.mark.vm
def test_arm64_disk_boots_healthy_from_its_read_only_erofs_root(arm64_disk: BuiltDisk,
                                                                 tmp_path: Path) -> None:
    image = arm64_disk.path
    assert arm64_disk.record.architecture == "aarch64"
    table = {p["name"]: p["type"].upper() for p in rawdisk.read_partition_table(image)}
    assert table["root-a"] == table["root-b"] == assemble.ROOT_TYPES[Architecture.aarch64]
    loader = esp_file(image, "EFI/BOOT/BOOTAA64.EFI")
    assert loader == esp_file(image, "EFI/systemd/systemd-bootaa64.efi")
    assert pe_machine(loader) == PE_MACHINE_ARM64
    kernel = esp_file(image, "kiln/a/vmlinuz")
    assert pe_machine(kernel) == PE_MACHINE_ARM64  # uncompressed: systemd-boot starts it (not gzip)
    entry = esp_file(image, f"loader/entries/kiln-{arm64_disk.version}-a.conf").decode()
    assert "console=ttyAMA0,115200n8" in entry and "kiln.slot=a" in entry
    report = json.loads((paths.model_dir(ARM64_CLASS, "digits", "1.0.0") / "report.json").read_text())
    assert report["runtime"]["isa"] == "aarch64", report["runtime"]  # gated on arm64, golden set from there

    cfg = vm.VMConfig(disk=image, snapshot=True, ssh_key=arm64_disk.ssh_key, workdir=tmp_path / "vm")
    with vm.start_vm(cfg) as machine:
        assert machine.argv[0].endswith("qemu-system-aarch64")
        healthy = machine.wait_for_healthy(ARM64_BOOT_TIMEOUT)
        machine.wait_for_ssh(ARM64_BOOT_TIMEOUT)
        out = machine.ssh("uname -m; grep -o 'kiln.slot=[ab]' /proc/cmdline; findmnt -n -o FSTYPE,OPTIONS /; "
                          "cat /var/lib/kiln/health/inference.json").stdout.splitlines()
        assert out[0] == "aarch64"
        assert out[1] == "kiln.slot=a"
        fstype, options = out[2].split()
        assert fstype == "erofs" and "ro" in options.split(","), out[2]
        health = json.loads("\n".join(out[3:]))
        assert health["status"] == "healthy" and health["exit_code"] == 0, health
        st = status(machine)
        assert (st["version"], st["bootedSlot"]) == (arm64_disk.version, "a"), st
        assert st["root"] == {"fstype": "erofs", "readOnly": True}, st  # what `kiln demo` prints
        assert st["health"]["status"] == "healthy" and st["health"]["models"] == ["digits"], st
        machine.poweroff()
    print(f"arm64-vision healthy {healthy:.1f} s after QEMU started")


# --- the update and the rollback: scripts/test-arm64 ----------------------------------------------


@pytest.fixture(scope="module")
def arm64_releases(arm64_disk: BuiltDisk, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Releases]:
    with serving_releases(tmp_path_factory.mktemp("arm64-ota"), cls=ARM64_CLASS) as rel:
        rel.release(arm64_disk.version)
        yield rel


@pytest.fixture(scope="module")
def arm64_device(arm64_disk: BuiltDisk, tmp_path_factory: pytest.TempPathFactory) -> vm.VMConfig:
    tmp = tmp_path_factory.mktemp("arm64-device")
    image = copy_disk(arm64_disk.path, tmp / "disk.raw")
    return vm.VMConfig(disk=image, ssh_key=arm64_disk.ssh_key, workdir=tmp / "vm", no_reboot=True)


@pytest.mark.arm64long
def test_arm64_model_only_update_boots_slot_b_and_is_blessed(arm64_releases: Releases,
                                                            arm64_device: vm.VMConfig) -> None:
    v1 = json.loads(paths.record_path(ARM64_CLASS, "1.0.0").read_text())
    v2 = arm64_releases.release("1.0.1", make_retrained_project(arm64_releases.tmp / "v2", cls=ARM64_CLASS))
    changed = [b["group"] for a, b in zip(v1["layers"], v2["layers"], strict=True) if a["diffId"] != b["diffId"]]
    assert changed == ["model", "release"], changed
    with vm.start_vm(arm64_device) as machine:
        machine.wait_for_ssh(ARM64_BOOT_TIMEOUT)
        configure(machine, arm64_releases)
        assert agent(machine, "check").exit_status == 0
        machine.ssh("systemd-run --unit kiln-test-update --collect kiln-agent update")
        machine.wait_exit(ARM64_BOOT_TIMEOUT)  # the agent reboots at the end (-no-reboot: QEMU exits)
    with vm.start_vm(arm64_device) as machine:
        machine.wait_for_healthy(ARM64_BOOT_TIMEOUT)
        machine.wait_for_ssh(ARM64_BOOT_TIMEOUT)
        machine.ssh("systemctl is-active --wait systemd-bless-boot.service || true", timeout=300)
        st = status(machine)
        assert (st["version"], st["bootedSlot"]) == ("1.0.1", "b"), st
        assert machine.ssh("uname -m").stdout.strip() == "aarch64"
        assert "kiln-1.0.1-b.conf" in machine.ssh("ls /efi/loader/entries").stdout.split()  # blessed
        # what the agent wrote to the ESP for slot B: the arm64 kernel as an EFI image, as `kiln disk` wrote A's
        head = machine.ssh("od -A n -t x1 -N 2 /efi/kiln/b/vmlinuz; cmp /efi/kiln/a/vmlinuz /efi/kiln/b/vmlinuz "
                           "&& echo same").stdout.split()
        assert head[:2] == ["4d", "5a"] and head[-1] == "same", head  # "MZ"; the kernel did not change
        assert st["lastResult"]["result"] == "success", st
        machine.poweroff()


@pytest.mark.arm64long
def test_arm64_failed_golden_check_rolls_back_by_itself(arm64_releases: Releases,
                                                       arm64_device: vm.VMConfig) -> None:
    arm64_releases.release("1.0.2", make_broken_golden_project(arm64_releases.tmp / "v3", cls=ARM64_CLASS,
                                                                          state=arm64_releases.state))
    with vm.start_vm(arm64_device) as machine:
        machine.wait_for_ssh(ARM64_BOOT_TIMEOUT)
        assert status(machine)["version"] == "1.0.1"
        machine.ssh("systemd-run --unit kiln-test-update --collect kiln-agent update")
        machine.wait_exit(ARM64_BOOT_TIMEOUT)
    with boot_until_healthy_on(arm64_device, "b", boot_timeout=ARM64_BOOT_TIMEOUT) as (machine, boots):
        assert [b.slot for b in boots] == ["a", "a", "a", "b"], boots  # three trials of v3, then v2
        machine.wait_for_ssh(ARM64_BOOT_TIMEOUT)
        st = status(machine)
        assert (st["version"], st["bootedSlot"]) == ("1.0.1", "b"), st
        assert [rb["version"] for rb in st["rollbacks"]] == ["1.0.2"], st
        assert "1.0.2" in st["blocklist"]
        assert agent(machine, "check").exit_status == 5  # never retried
        machine.poweroff()


# --- jetson-vision-standard's stand-in: scripts/test-arm64 ------------------------------------------

UNHEALTHY = r"kiln-health-inference: [a-z-]+ \(exit [1-9]"


@pytest.fixture(scope="module")
def stand_in_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltDisk]:
    """jetson-vision-standard-stand-in built into the test store (qemu-user), and its raw disk."""
    for tool in (*VM_TOOLS[1:], "qemu-system-aarch64"):
        require_tool(tool)
    from tests.images import arm64_image, kiln_test_context, kiln_test_state

    state = kiln_test_state()
    build: dict[str, Any] = arm64_image(state, cls=JETSON_STAND_IN)
    out = tmp_path_factory.mktemp("stand-in-disk") / "disk.raw"
    record = assemble.make_disk(kiln_test_context(state), build["image"]["ref"], output=out, version=build["version"])
    yield BuiltDisk(out, record, record.class_name, record.version, paths.ssh_key_path(JETSON_STAND_IN))
    out.unlink(missing_ok=True)


@pytest.mark.arm64long
def test_jetson_stand_in_boots_on_arm64_and_fails_as_its_class_declares(stand_in_disk: BuiltDisk,
                                                                         tmp_path: Path) -> None:
    report = json.loads((paths.model_dir(JETSON_STAND_IN, "digits", "1.0.0") / "report.json").read_text())
    assert (report["runtime"]["isa"], report["runtime"]["onnxruntime"]) == ("aarch64", "1.20.0"), report["runtime"]
    cfg = vm.VMConfig(disk=stand_in_disk.path, snapshot=True, ssh_key=stand_in_disk.ssh_key,
                      workdir=tmp_path / "vm")
    with vm.start_vm(cfg) as machine:
        assert machine.argv[0].endswith("qemu-system-aarch64")
        checked = machine.wait_for_console(UNHEALTHY, ARM64_BOOT_TIMEOUT)
        machine.wait_for_ssh(ARM64_BOOT_TIMEOUT)
        console = machine.console_text()
        files = {}
        for name, path in (("gpu", "health/gpu.json"), ("health", "health/inference.json"),
                           ("accelerator", "inference/accelerator.json")):
            files[name] = json.loads(machine.ssh(f"cat /var/lib/kiln/{path}").stdout)
        uname = machine.ssh("uname -m").stdout.strip()
        service = machine.ssh("systemctl show -p ExecMainStatus --value kiln-inference.service").stdout.strip()
        st = status(machine)
        machine.poweroff()
    assert uname == "aarch64"
    assert (st["class"], st["version"], st["bootedSlot"], st["bootControl"]) == (
        JETSON_STAND_IN, stand_in_disk.version, "a", "systemd-boot"), st
    # gpu-visible looks for the Orin's GPU (nvgpu), finds none, and policy fail makes that a failure
    gpu = files["gpu"]
    assert (gpu["accelerator"], gpu["policy"], gpu["status"], gpu["visible"]) == (
        "nvidia-jetson", "fail", "gpu-missing", False), gpu
    assert "the nvgpu kernel module is not loaded (no /sys/module/nvgpu)" in gpu["missing"], gpu
    assert re.search(r"kiln-health-gpu: FAIL: no GPU visible: the nvgpu kernel module is not loaded", console), \
        console[-3000:]
    # the service opened the model on the CPU runtime, found TensorRT missing and would not serve
    acc = files["accelerator"]
    assert acc["policy"] == "fail" and acc["failed"], acc
    assert "TensorrtExecutionProvider unavailable: not in this onnxruntime 1.20.0 build" in acc["failed"], acc
    assert service == "4", service
    # the golden check: accelerator-unavailable, as the class's fallback says
    health = files["health"]
    assert (health["status"], health["exit_code"]) == ("accelerator-unavailable", 5), health
    assert st["health"]["status"] == "accelerator-unavailable", st
    # and it did not wait out --wait for a service that had said it would not serve
    service = [p["message"] for p in health["problems"] if p["code"] == 4]
    assert len(service) == 1 and "will not serve this boot" in service[0], health["problems"]
    print(f"{JETSON_STAND_IN}: its golden check failed as policy fail says {checked:.1f} s after QEMU started")
