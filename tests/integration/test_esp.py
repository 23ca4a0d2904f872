"""The factory ESP, made with the real mkfs.vfat and mtools and read back: slot B's directory starts
with slot A's kernel and initramfs only where the ESP holds a third pair (an update writes a new
kernel beside the old one before the rename); an ESP without room for two pairs is refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builder.core.errors import DiskError
from builder.disk import assemble, unpacked
from tests.conftest import require_tool
from tests.unit.test_disk import make_rootfs

MiB = 1024**2


def make_esp(tmp_path: Path, esp_mib: int, kernel_mib: int, initrd_mib: int) -> Path:
    rootfs = make_rootfs(tmp_path / "rootfs", disk_spec={"esp": esp_mib * MiB})
    kdir = rootfs / "usr/lib/modules/6.1.0-99-amd64"
    (kdir / "vmlinuz").write_bytes(os.urandom(kernel_mib * MiB))
    (kdir / "initramfs.img").write_bytes(os.urandom(initrd_mib * MiB))
    boot = rootfs / assemble.SYSTEMD_BOOT_DIR
    boot.mkdir(parents=True)
    (boot / "systemd-bootx64.efi").write_bytes(b"MZ systemd-boot stand-in")
    info = unpacked.read_image_info(rootfs, "test-image")
    plan = assemble.finalize_disk_plan(info, output=tmp_path / "disk.raw")
    out = tmp_path / "esp.img"
    assemble.make_esp_image(plan, info, rootfs, out, tmp_path / "esp-tree")
    return out


def esp_ls(esp: Path, path: str) -> list[str]:
    r = subprocess.run(["mdir", "-b", "-i", str(esp), f"::{path}"], capture_output=True, text=True, check=True,
                       env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return sorted(line.rsplit("/", 1)[-1] for line in r.stdout.split())


def esp_read(esp: Path, path: str) -> bytes:
    return subprocess.run(["mtype", "-i", str(esp), f"::{path}"], capture_output=True, check=True,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("mkfs.vfat", "mcopy", "mdir", "mtype"):
        require_tool(tool)


def test_slot_b_starts_with_slot_a_kernel_where_a_third_pair_fits(tmp_path: Path) -> None:
    esp = make_esp(tmp_path, esp_mib=64, kernel_mib=6, initrd_mib=4)  # 3 x 10 MiB <= 90 % of 64
    assert esp_ls(esp, "/kiln/b") == ["initramfs.img", "vmlinuz"]
    for name in ("vmlinuz", "initramfs.img"):
        assert esp_read(esp, f"/kiln/b/{name}") == esp_read(esp, f"/kiln/a/{name}")
    assert esp_ls(esp, "/loader/entries") == ["kiln-1.2.3-a.conf"]  # nothing names slot B


def test_slot_b_stays_empty_where_only_two_pairs_fit(tmp_path: Path) -> None:
    esp = make_esp(tmp_path, esp_mib=64, kernel_mib=16, initrd_mib=8)  # 2 x 24 fit, 3 x 24 do not
    assert esp_ls(esp, "/kiln/a") == ["initramfs.img", "vmlinuz"]
    assert esp_ls(esp, "/kiln/b") == []


def test_an_esp_without_room_for_two_pairs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="the ESP is too small: two slots of kernel"):
        make_esp(tmp_path, esp_mib=64, kernel_mib=24, initrd_mib=8)
