"""Verified boot under attack (issue 32), on a disk whose trial entries were tampered with while it was off.

An attacker with the disk (a stolen device, an evil maid) writes slot B and three trial entries for it,
each newer than the factory's slot A, each with one try:

- `kiln-9.9.9-b+1.efi`: the image's own slot B UKI with one byte of its initramfs changed;
- `kiln-9.9.8-b+1.efi`: the same UKI, unchanged inside, but signed with a key the firmware does not know;
- `kiln-9.9.7-b+1.efi`: the image's own, untouched slot B UKI; but slot B's layer list has one byte changed.

systemd-boot tries each in turn (newest first, each try counted down on the ESP). The firmware refuses
to start the first two (Secure Boot: a bad or unknown signature); the third starts, and its initramfs
refuses the list, whose sha256 is not the digest the signed command line binds. With every try used up,
systemd-boot boots slot A, which is healthy, and the device reports each entry as tried and exhausted.

One boot sequence shows all three, on one disk copy (about 4 minutes under TCG).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builder.disk import rawdisk, vm
from builder.keys.secureboot import make_secureboot_keys, sign_efi
from kiln_device.pe import read_headers
from tests.conftest import require_tool
from tests.vm.conftest import BOOT_TIMEOUT, BuiltDisk, copy_disk
from tests.vm.otakit import boot_until_healthy_on, esp_entries, status

pytestmark = pytest.mark.vm

MTOOLS = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}


def esp_get(disk: Path, name: str, out: Path) -> Path:
    offset = rawdisk.partition_offset(disk, "esp")
    subprocess.run(["mcopy", "-n", "-i", f"{disk}@@{offset}", f"::/{name}", str(out)], env=MTOOLS, check=True)
    return out


def esp_put(disk: Path, src: Path, name: str) -> None:
    offset = rawdisk.partition_offset(disk, "esp")
    subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{offset}", str(src), f"::/{name}"], env=MTOOLS, check=True)


def flip(data: bytes, section: str, at: int = 4096) -> bytes:
    sec = read_headers(data).section(section)
    assert sec is not None
    out = bytearray(data)
    out[sec.raw_offset + at] ^= 0x01
    return bytes(out)


def slot_list_erofs(text: bytes, out: Path, tmp: Path) -> Path:
    tree = tmp / "list-tree"
    tree.mkdir()
    (tree / "kiln-layers").write_bytes(text)
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", str(out), str(tree)], check=True)
    return out


def test_a_tampered_uki_a_foreign_signature_and_a_tampered_list_each_fall_back_to_slot_a(
        qemu_disk: BuiltDisk, tmp_path: Path) -> None:
    for tool in ("sbsign", "sbattach", "mcopy", "mkfs.erofs"):
        require_tool(tool)
    assert qemu_disk.record.layers_digest, "the vm tier's disk boots verified (qemu-x86_64 has spec.secureBoot)"
    disk = copy_disk(qemu_disk.path, tmp_path / "disk.raw")
    (tmp_path / "disk.raw.json").write_text(qemu_disk.path.with_name(qemu_disk.path.name + ".json").read_text())
    # The image's own slot B UKI, as the boot layer carries it: the disk's slot A UKI is its twin.
    image_b = tmp_path / "kiln-b.efi"
    subprocess.run(["podman", "image", "exists", qemu_disk.record.source], env=_engine_env(), check=True)
    mount = subprocess.run(["podman", "image", "mount", qemu_disk.record.source], env=_engine_env(), check=True,
                           capture_output=True, text=True).stdout.strip()
    try:
        image_b.write_bytes((Path(mount) / "usr/lib/kiln/boot/kiln-b.efi").read_bytes())
    finally:
        subprocess.run(["podman", "image", "unmount", qemu_disk.record.source], env=_engine_env(), check=False)
    genuine = image_b.read_bytes()

    tampered = tmp_path / "tampered.efi"
    tampered.write_bytes(flip(genuine, ".initrd"))
    foreign = tmp_path / "foreign.efi"
    subprocess.run(["sbattach", "--remove", str(image_b)], check=True)  # the same bytes, unsigned ...
    other = make_secureboot_keys(tmp_path / "other-keys", None, common_name="Not Kiln")
    sign_efi(other, image_b, None, out=foreign)  # ... signed by a key the firmware does not know
    untouched = tmp_path / "untouched.efi"
    untouched.write_bytes(genuine)
    esp_put(disk, tampered, "EFI/Linux/kiln-9.9.9-b+1.efi")
    esp_put(disk, foreign, "EFI/Linux/kiln-9.9.8-b+1.efi")
    esp_put(disk, untouched, "EFI/Linux/kiln-9.9.7-b+1.efi")

    # Slot B: slot A's layer list (the one the genuine UKI binds) with one byte changed.
    slot_a = tmp_path / "root-a.img"
    offset_a = rawdisk.partition_offset(disk, "root-a")
    with disk.open("rb") as f:
        f.seek(offset_a)
        slot_a.write_bytes(f.read(1 << 20))
    listed = _read_list(slot_a, tmp_path)
    changed = bytearray(listed)
    changed[10] = ord("0") if changed[10] != ord("0") else ord("1")
    slot_b = slot_list_erofs(bytes(changed), tmp_path / "root-b.img", tmp_path)
    rawdisk.copy_sparse(slot_b, disk, rawdisk.partition_offset(disk, "root-b"))

    cfg = vm.VMConfig(disk=disk, ssh_key=qemu_disk.ssh_key, workdir=tmp_path / "vm", no_reboot=True)
    with boot_until_healthy_on(cfg, "a", max_boots=5, boot_timeout=BOOT_TIMEOUT) as (machine, boots):
        st = status(machine)
        console = "\n".join(b.console for b in boots)
        machine.poweroff()
    assert st["bootedSlot"] == "a" and st["secureBoot"] == "enabled", st
    assert st["rootDigest"] == qemu_disk.record.layers_digest
    # The firmware refused the first two (systemd-boot could not load them: Access Denied); no kernel of theirs
    # started. With nothing started, OVMF waits at its boot manager, where the harness cuts the power as a
    # device's platform watchdog would.
    for version in ("9.9.9", "9.9.8"):
        assert f"Error loading \\EFI\\Linux\\kiln-{version}-b+0-1.efi: Access Denied" in console, console[-3000:]
    # Slot B's kernel started once (the genuine UKI), and its initramfs refused slot B's list.
    on_b = [b for b in boots if b.slot == "b"]
    assert len(on_b) == 1 and "the layer list measures" in on_b[0].console, boots
    assert "the signed command line wants " + qemu_disk.record.layers_digest in on_b[0].console
    entries = esp_entries(disk)
    for version in ("9.9.9", "9.9.8", "9.9.7"):
        assert f"kiln-{version}-b+0-1.efi" in entries, entries  # tried once each, and exhausted
    assert f"kiln-{qemu_disk.version}-a.efi" in entries


def _read_list(erofs: Path, tmp: Path) -> bytes:
    """/kiln-layers from an erofs image (mounted read-only on a loop device for a moment)."""
    mnt = tmp / "mnt-list"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(erofs), str(mnt)], check=True)
    try:
        return (mnt / "kiln-layers").read_bytes()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _engine_env() -> dict[str, str]:
    from tests.images import kiln_test_state

    return {**os.environ, **kiln_test_state().engine_env()}
