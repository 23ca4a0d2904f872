"""Verified boot on the device's side: the agent writes a slot's signed UKI, never a kernel it cannot vouch for.

An image with verified boot (builder.image.boot) carries, as its top layer, one UKI per slot whose
signed command line binds the digest of the slot's layer list. The real agent, against a real
registry on 127.0.0.1 and as root (it builds each layer's erofs), must:
- build the root's layers (the boot layer left out), check that the UKI for the target slot binds
  exactly the list it built, stage it on the ESP and rename it to `EFI/Linux/kiln-<v>-b+3.efi`;
- refuse a UKI that binds another list (the slot would never boot), writing nothing;
- on a device that boots verified, refuse an image without UKIs (it would boot unverified).

The UKIs here are real PE images: systemd's stub with the sections Kiln adds (builder.image.uki);
the kernel inside is a few bytes, since nothing boots them. The firmware's signature check is the
vm tier's (tests/vm/test_boot.py, tests/vm/test_ota.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.core.state import StateDir
from builder.image.boot import make_layer_erofs
from builder.image.uki import UkiParts, add_sections
from builder.keys.release_key import SigningKey
from kiln_device import contract
from kiln_device.layers import manifest_text, mounts_under
from kiln_device.pe import text_section
from tests.conftest import require_tool
from tests.ota import FakeDevice, make_oci_image, ota_services, publish, release_files, release_labels

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="layers need root: device nodes, overlayfs xattrs, loop mounts")]

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
BASE = {"usr/share/base/os.bin": b"the base layer\n" * 4096}


@dataclass
class World:
    registry: str
    lookaside: Path
    lookaside_url: str
    key: SigningKey
    state: StateDir
    layout: Path
    tmp: Path

    def release(self, version: str, channel: str, *, bind: str | None = None, boot: bool = True) -> str:
        """VERSION with a boot layer whose UKIs bind the root's layer list (or `bind`), or without one."""
        files = release_files(version=version)
        labels = release_labels(version=version, layers="lz4")
        top = None
        if boot:
            measure = self.tmp / f"measure-{version}"
            make_oci_image(measure, version, files, labels, base=BASE)  # the root's layers, as the build sees them
            layers = make_layer_erofs(measure, version, self.tmp / "build-store", "lz4")
            digest = bind or contract.layers_digest(manifest_text(layers))
            top = {f"usr/lib/kiln/boot/kiln-{slot}.efi": uki(self.tmp, version, slot, digest)
                   for slot in contract.SLOTS}
            labels = {**labels, contract.LABEL_BOOT: contract.BOOT_UKI, contract.LABEL_BOOT_LAYERS: digest}
        make_oci_image(self.layout, version, files, labels, base=BASE, top=top)
        return publish(self.registry, "kiln/tiny", self.layout, version, key=self.key, lookaside=self.lookaside,
                       cls="tiny", tags=(version, channel), state=self.state)

    def device(self, name: str, channel: str) -> FakeDevice:
        return FakeDevice.create(self.tmp / name, registry=self.registry, lookaside=self.lookaside_url, key=self.key,
                                 channel=channel)


def uki(tmp: Path, version: str, slot: str, digest: str) -> bytes:
    kernel, initrd = tmp / f"vmlinuz-{version}", tmp / f"initrd-{version}"
    kernel.write_bytes(f"kernel of {version}\n".encode())
    initrd.write_bytes(f"initramfs of {version}\n".encode())
    cmdline = contract.render_uki_cmdline(slot=slot, layers=digest, kargs=("console=ttyS0,115200n8",))
    osrel = f'ID=debian\nIMAGE_VERSION={contract.entry_text(version)}\n'
    return add_sections(STUB.read_bytes(), UkiParts(kernel, initrd, cmdline, osrel, "6.1.0-test").sections())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not STUB.is_file():
        require_tool(f"{STUB} (apt-get install systemd-boot-efi)")
    tmp = tmp_path_factory.mktemp("verified")
    with ota_services(tmp, ("skopeo", "mkfs.erofs", "fsverity", "tar", "gpg", "docker-registry")) as s:
        yield World(s.registry, s.lookaside, s.lookaside_url, s.key, s.state, tmp / "oci", tmp)
    assert not mounts_under(tmp), "a test left something mounted"


def test_a_verified_update_writes_the_slots_signed_uki_and_its_bound_list(world: World) -> None:
    world.release("3.0.0", "ch-verified")
    dev = world.device("verified", "ch-verified")
    active = hashlib.sha256(dev.slot("a").read_bytes()).hexdigest()
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert "layers: 2 built" in proc.stderr, proc.stderr  # base and release: the boot layer is not the root's
    assert hashlib.sha256(dev.slot("a").read_bytes()).hexdigest() == active
    trust = dev.state()["slots"]["b"]
    assert len(trust["layers"]) == 2 and len(list(dev.layers.glob("*.erofs"))) == 2
    # The trial entry is the UKI itself, under systemd's boot counter; nothing else on the ESP boots slot B.
    uki_dir = dev.esp / "EFI/Linux"
    assert sorted(p.name for p in uki_dir.iterdir()) == ["kiln-3.0.0-b+3.efi"]
    written = uki_dir / "kiln-3.0.0-b+3.efi"
    cmdline = (text_section(written, ".cmdline") or "").split()
    assert "kiln.slot=b" in cmdline and "root=PARTLABEL=root-b" in cmdline
    assert not (dev.esp / "kiln/b").exists() and not list(dev.entries.glob("*-b*.conf"))
    # The slot's list is what the UKI binds, byte for byte (what the initramfs checks).
    listed = (dev.root / "var/lib/kiln/work/rootfs/kiln-layers")
    assert not listed.exists()  # the work tree is gone; read the list back from the slot itself
    mnt = world.tmp / "slot-b"
    mnt.mkdir()
    os.system(f"mount -t erofs -o ro,loop {dev.slot('b')} {mnt}")
    try:
        text = (mnt / "kiln-layers").read_bytes()
    finally:
        os.system(f"umount {mnt}")
    assert f"kiln.layers={contract.layers_digest(text)}" in cmdline
    status = dev.status()
    assert "kiln-3.0.0-b+3.efi" in status["entries"], status


def test_a_uki_bound_to_another_list_is_refused_and_nothing_is_written(world: World) -> None:
    world.release("3.1.0", "ch-wrong-bind", bind="sha256:" + "0" * 64)
    dev = world.device("wrong-bind", "ch-wrong-bind")
    before = {name: hashlib.sha256(dev.slot(name).read_bytes()).hexdigest() for name in ("a", "b")}
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == contract.BAD_IMAGE, proc.stderr
    assert "binds layer list sha256:000000000000" in proc.stderr and "the slot would not boot" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {name: hashlib.sha256(dev.slot(name).read_bytes()).hexdigest() for name in ("a", "b")} == before
    assert not (dev.esp / "EFI/Linux").exists() or not list((dev.esp / "EFI/Linux").iterdir())
    again = dev.agent("update", "--no-reboot")  # blocklisted: refused without being fetched again
    assert again.returncode == contract.BLOCKLISTED, again.stderr


def test_a_device_that_boots_verified_refuses_an_image_without_ukis(world: World) -> None:
    world.release("3.2.0", "ch-unverified", boot=False)
    dev = world.device("downgrade-trust", "ch-unverified")
    (dev.root / "proc/cmdline").write_text("root=PARTLABEL=root-a ro kiln.slot=a kiln.layers=sha256:"
                                           + "1" * 64 + "\n")
    before = hashlib.sha256(dev.slot("b").read_bytes()).hexdigest()
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == contract.INCOMPATIBLE, proc.stderr
    assert "it would boot unverified" in proc.stderr and "Traceback" not in proc.stderr
    assert hashlib.sha256(dev.slot("b").read_bytes()).hexdigest() == before
