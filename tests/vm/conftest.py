"""The vm tier: QEMU boots of a disk made from the real qemu-x86_64 image.

One image build (tests.images.qemu_image), one disk, one shared boot for the
read-only checks (`booted`, `host`); destructive tests copy the disk and boot
their own VMs. Tools missing -> skip locally, fail under CI=true.

For working on these tests against another image:
KILN_VM_TEST_IMAGE=<ref in KILN_TEST_STATE_DIR's store> KILN_VM_TEST_SSH_KEY=<private key>.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.core import paths
from builder.disk import assemble, rawdisk, vm
from builder.spec.loader import load_class
from tests.conftest import ROOT, require_tool

VM_TOOLS = ("qemu-system-x86_64", "mkfs.erofs", "mkfs.ext4", "mkfs.vfat", "mcopy", "sfdisk", "debugfs")
BOOT_TIMEOUT = float(os.environ.get("KILN_VM_BOOT_TIMEOUT", "900"))  # TCG on a busy 2-core machine


@dataclass(frozen=True)
class BuiltDisk:
    path: Path
    record: assemble.DiskRecord
    class_name: str
    version: str
    ssh_key: Path

    def partition_uuid(self, label: str) -> str:
        return next(p["uuid"] for p in self.record.partitions if p["label"] == label)


def require_vm_tools() -> None:
    for tool in VM_TOOLS:
        require_tool(tool)
    try:
        vm.find_firmware()
    except Exception as exc:
        require_tool(f"OVMF ({exc})")


@pytest.fixture(scope="session")
def qemu_disk(tmp_path_factory: pytest.TempPathFactory) -> BuiltDisk:
    """qemu-x86_64 built into the test store, and its raw disk (made once per session)."""
    require_vm_tools()
    from tests.images import QEMU_CLASS, kiln_test_context, kiln_test_state, qemu_image

    state = kiln_test_state()
    ref = os.environ.get("KILN_VM_TEST_IMAGE")
    version = None
    if not ref:
        build: dict[str, Any] = qemu_image(state)
        ref, version = build["image"]["ref"], build["version"]
    out = tmp_path_factory.mktemp("disk") / "disk.raw"
    record = assemble.make_disk(kiln_test_context(state), ref, output=out, version=version)
    key = Path(os.environ.get("KILN_VM_TEST_SSH_KEY") or paths.ssh_key_path(QEMU_CLASS))
    return BuiltDisk(out, record, record.class_name, record.version, key)


def copy_disk(src: Path, dest: Path) -> Path:
    """A sparse copy of a disk (destructive tests never touch the shared one)."""
    with src.open("rb") as fin, dest.open("wb") as fout:
        fout.truncate(os.fstat(fin.fileno()).st_size)
    rawdisk.copy_sparse(src, dest, 0)
    return dest


@pytest.fixture(scope="module")
def booted(qemu_disk: BuiltDisk, tmp_path_factory: pytest.TempPathFactory) -> Iterator[vm.VM]:
    """One boot of the shared disk (snapshot: the disk stays pristine), up and healthy-or-not; powered off
    when the module's tests are done (an idle TCG guest still takes CPU from the VMs after it)."""
    cfg = vm.VMConfig(disk=qemu_disk.path, snapshot=True, ssh_key=qemu_disk.ssh_key,
                      workdir=tmp_path_factory.mktemp("vm"))
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        yield machine
        machine.poweroff()


@pytest.fixture(scope="module")
def host(booted: vm.VM, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """pytest-testinfra over paramiko against the shared VM."""
    testinfra = pytest.importorskip("testinfra")
    config = tmp_path_factory.mktemp("ssh") / "config"
    config.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    assert booted.config.ssh_key is not None
    return testinfra.get_host(f"paramiko://root@127.0.0.1:{booted.ssh_port}",
                              ssh_identity_file=str(booted.config.ssh_key), ssh_config=str(config))


@pytest.fixture(scope="session")
def qemu_class_args() -> tuple[str, ...]:
    return load_class("qemu-x86_64", ROOT / "images").spec.kernel.args
