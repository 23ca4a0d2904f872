"""The disk itself, read from the host without mounting: GPT, ESP, erofs, data; reproducible; bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from builder.core import paths
from builder.disk import assemble, rawdisk
from builder.spec import names
from builder.spec.loader import load_class
from kiln_device.pe import text_section
from tests.conftest import ROOT, kiln
from tests.vm.conftest import BuiltDisk


def kiln_disk(*args: str):  # type: ignore[no-untyped-def]
    """`kiln disk ARGS` on the test store."""
    from tests.images import TEST_STATE

    return kiln("disk", *args, state=TEST_STATE, timeout=600)



def test_partition_table(qemu_disk: BuiltDisk) -> None:
    parts = rawdisk.read_partition_table(qemu_disk.path)
    assert [p["name"] for p in parts] == ["esp", "root-a", "root-b", "data"]
    for p, planned in zip(parts, qemu_disk.record.partitions, strict=True):
        assert p["uuid"].lower() == planned["uuid"]
        assert int(p["start"]) * 512 == planned["start"]


def esp_file(image: Path, path: str) -> str:
    return esp_bytes(image, path).decode()


def test_esp_has_the_signed_loader_and_slot_as_uki(qemu_disk: BuiltDisk, tmp_path: Path) -> None:
    """Verified boot: the ESP holds systemd-boot and slot A's UKI, both signed with the class's db key
    (sbverify), and nothing unsigned that boots: no kernel, initramfs or .conf entry."""
    conf = esp_file(qemu_disk.path, "/loader/loader.conf")
    assert "timeout 0" in conf and "default kiln-*" in conf
    offset = rawdisk.partition_offset(qemu_disk.path, "esp")
    listing = subprocess.run(["mdir", "-/", "-b", "-i", f"{qemu_disk.path}@@{offset}", "::/"],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout.split()
    uki = f"::/EFI/Linux/kiln-{qemu_disk.version}-a.efi"
    for f in ("::/EFI/BOOT/BOOTX64.EFI", "::/EFI/systemd/systemd-bootx64.efi", uki):
        assert f in listing
    assert not [f for f in listing if f.startswith(("::/kiln/", "::/loader/entries/")) and not f.endswith("/")]
    cert = paths.dev_signing_key_dir(qemu_disk.class_name) / "secureboot" / "db.crt"
    for f in ("::/EFI/BOOT/BOOTX64.EFI", uki):
        local = tmp_path / f.rsplit("/", 1)[1]
        local.write_bytes(esp_bytes(qemu_disk.path, f.removeprefix("::")))
        assert subprocess.run(["sbverify", "--cert", str(cert), str(local)], capture_output=True).returncode == 0, f
    cmdline = text_section(tmp_path / uki.rsplit("/", 1)[1], ".cmdline") or ""
    assert "root=PARTLABEL=root-a" in cmdline.split() and "kiln.slot=a" in cmdline.split()
    assert f"kiln.layers={qemu_disk.record.layers_digest}" in cmdline.split()
    assert qemu_disk.record.efivars and Path(qemu_disk.record.efivars).is_file()


def esp_bytes(image: Path, path: str) -> bytes:
    offset = rawdisk.partition_offset(image, "esp")
    return subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::{path}"], capture_output=True,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, check=True).stdout


def test_same_image_and_version_give_the_same_disk(qemu_disk: BuiltDisk, tmp_path: Path) -> None:
    """Principle 1, for disks: identifiers and timestamps are fixed."""
    again = assemble.make_disk(_context(), qemu_disk.record.source, output=tmp_path / "again.raw",
                           version=qemu_disk.version)
    assert again.partitions == qemu_disk.record.partitions
    assert _sha(tmp_path / "again.raw") == _sha(qemu_disk.path)


def _context():  # type: ignore[no-untyped-def]
    from tests.images import kiln_test_context

    return kiln_test_context()


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_cli_disk_size_smaller_than_the_image(qemu_disk: BuiltDisk, tmp_path: Path) -> None:
    out = tmp_path / "small.raw"
    r = kiln_disk(qemu_disk.record.source, "--size", "1GiB", "-o", str(out))
    assert r.returncode == 9, r.stderr
    assert "disk size 1 GiB is smaller than the image's layout needs" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_cli_disk_not_a_kiln_image(tmp_path: Path) -> None:
    """The offline base is an image with a kernel, but not a Kiln one (no release.json, no initramfs).

    An image without a kernel: tests/unit/test_disk.py (a rootfs directory, the same code path).
    """
    from tests.images import kiln_test_state

    kiln_test_state()
    base = names.base_ref(load_class("qemu-x86_64", ROOT / "images"))  # the class's, built with its image
    r = kiln_disk(base, "-o", str(tmp_path / "d.raw"))
    assert r.returncode == 9, r.stderr
    assert "is not a Kiln image" in r.stderr and not (tmp_path / "d.raw").exists()


def test_cli_disk_json_and_etc_files(qemu_disk: BuiltDisk, tmp_path: Path) -> None:
    """qcow2 and --json; --etc puts a device's own files in its data partition's /etc overlay."""
    agent = tmp_path / "agent.json"
    agent.write_text('{"registry": "10.0.2.2:5000", "channel": "beta"}\n')
    token = tmp_path / "token"
    token.write_text("per-device\n")
    token.chmod(0o600)
    r = kiln_disk(qemu_disk.record.source, "--version", qemu_disk.version, "--format", "qcow2",
             "-o", str(tmp_path / "d.qcow2"), "--json", "--etc", f"kiln/agent.json={agent}",
             "--etc", f"kiln/token={token}")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["format"] == "qcow2" and (tmp_path / "d.qcow2").read_bytes()[:4] == b"QFI\xfb"
    assert json.loads((tmp_path / "d.qcow2.json").read_text())["class_name"] == "qemu-x86_64"
    assert [e["path"] for e in record["etc"]] == ["/etc/kiln/agent.json", "/etc/kiln/token"]
    assert "per-device" not in r.stdout + r.stderr
    raw = tmp_path / "d.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", tmp_path / "d.qcow2", raw], check=True)
    (tmp_path / "d.qcow2").unlink()
    target = f"{raw}?offset={rawdisk.partition_offset(raw, 'data')}"
    upper = "/overlay/etc/upper/kiln"
    cat = subprocess.run(["debugfs", "-R", f"cat {upper}/agent.json", target], capture_output=True, text=True)
    assert json.loads(cat.stdout) == {"registry": "10.0.2.2:5000", "channel": "beta"}
    st = subprocess.run(["debugfs", "-R", f"stat {upper}/token", target], capture_output=True, text=True).stdout
    assert "Mode:  0600" in st and "User:     0" in st, st
    raw.unlink()
    bad = kiln_disk(qemu_disk.record.source, "-o", str(tmp_path / "bad.raw"), "--etc", f"kiln/agent.json={token}")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.raw").exists()
