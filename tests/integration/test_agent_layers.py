"""Updates that write only what changed: images labelled dev.kiln.root-layers go into the layer
store (one erofs per OCI layer on the data partition) and their slot gets only the layer list.

The real agent against a real registry on 127.0.0.1 (as tests/integration/test_agent.py), as
root: it extracts layers with GNU tar, makes overlayfs whiteouts, builds each layer's erofs,
loop-mounts the stack to check the image, and the tests mount what it wrote the same way the
initramfs does (overlays/initramfs/.../kiln-overlay).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.core.state import StateDir
from builder.keys.release_key import SigningKey
from kiln_device.layers import mounts_under
from tests.ota import FakeDevice, Symlink, make_oci_image, ota_services, publish, release_files, release_labels

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="layers need root: device nodes, overlayfs xattrs, loop mounts")]

BASE: Mapping[str, bytes | Symlink] = {
    "usr/share/base/os.bin": b"base layer shared by every version\n" * 4096,
    "usr/share/base/old.conf": b"removed by 2.1.0\n",
    "usr/share/base/dir/kept-until-opaque": b"hidden by an opaque directory in 2.1.0\n",
    "usr/bin/tool": Symlink("../share/base/os.bin"),
}


@dataclass
class World:
    registry: str
    lookaside: Path
    lookaside_url: str
    key: SigningKey
    state: StateDir
    layout: Path
    tmp: Path

    def release(self, version: str, channel: str, extra: Mapping[str, bytes] | None = None) -> str:
        make_oci_image(self.layout, version, release_files(version=version, extra=extra),
                       release_labels(version=version, layers="lz4"), base=BASE)
        return publish(self.registry, "kiln/tiny", self.layout, version, key=self.key, lookaside=self.lookaside,
                       cls="tiny", tags=(version, channel), state=self.state)

    def device(self, name: str, channel: str) -> FakeDevice:
        return FakeDevice.create(self.tmp / name, registry=self.registry, lookaside=self.lookaside_url, key=self.key,
                                 channel=channel)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("layers")
    with ota_services(tmp, ("skopeo", "mkfs.erofs", "fsverity", "tar", "gpg", "docker-registry")) as s:
        yield World(s.registry, s.lookaside, s.lookaside_url, s.key, s.state, tmp / "oci", tmp)
    assert not mounts_under(tmp), "a test left something mounted"


def layer_files(dev: FakeDevice) -> dict[str, int]:
    """Layer erofs files in the store: name -> inode (an inode that stays is a layer not rewritten)."""
    return {p.name: p.stat().st_ino for p in sorted(dev.layers.glob("*.erofs"))}


@contextlib.contextmanager
def booted_root(dev: FakeDevice, slot: str, tmp: Path) -> Iterator[Path]:
    """Mount slot `slot` as the initramfs does: its small erofs, each listed layer checked against
    its fs-verity digest and loop-mounted, all stacked by overlayfs."""
    tmp.mkdir(parents=True, exist_ok=True)
    points: list[Path] = []
    try:
        manifest = tmp / "slot"
        manifest.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(dev.slot(slot)), str(manifest)], check=True)
        points.append(manifest)
        lines = (manifest / "kiln-layers").read_text().splitlines()
        lower = [str(manifest)]
        for i, line in enumerate(lines):
            diff_id, want = line.split()
            layer = dev.layers / f"{diff_id}.erofs"
            got = subprocess.run(["fsverity", "digest", str(layer)], capture_output=True, text=True,
                                 check=True).stdout.split()[0]
            assert got == want, f"layer {diff_id[:12]} measures {got}, the slot says {want}"
            point = tmp / f"{i}"
            point.mkdir()
            subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(layer), str(point)], check=True)
            points.append(point)
            lower.insert(0, str(point))
        root = tmp / "root"
        root.mkdir()
        subprocess.run(["mount", "-t", "overlay", "-o", f"ro,lowerdir={':'.join(lower)}", "test", str(root)],
                       check=True)
        points.append(root)
        yield root
    finally:
        for point in reversed(points):
            subprocess.run(["umount", str(point)], check=False)


def test_a_layered_update_writes_the_layers_and_a_small_slot(world: World) -> None:
    digest = world.release("2.0.0", "ch-layers")
    dev = world.device("layers", "ch-layers")
    active = hashlib.sha256(dev.slot("a").read_bytes()).hexdigest()
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert "layers: 2 built" in proc.stderr and "0 already on the device" in proc.stderr
    assert hashlib.sha256(dev.slot("a").read_bytes()).hexdigest() == active
    state = dev.state()
    trust = state["slots"]["b"]
    assert trust["digest"] == digest and len(trust["layers"]) == 2
    assert trust["size"] <= 64 * 1024, "the slot holds only the layer list"
    assert sorted(layer_files(dev)) == sorted(f"{i}.erofs" for i in trust["layers"])
    assert (dev.esp / "kiln/b/vmlinuz").read_bytes() == b"kernel of 2.0.0\n"
    with booted_root(dev, "b", world.tmp / "mnt-2.0.0") as root:
        release = json.loads((root / "usr/lib/kiln/release.json").read_text())
        assert release["version"] == "2.0.0"
        assert (root / "usr/share/base/os.bin").read_bytes() == BASE["usr/share/base/os.bin"]
        assert os.readlink(root / "usr/bin/tool") == "../share/base/os.bin"
        assert (root / "usr/share/kiln/payload.bin").read_bytes() == hashlib.sha256(b"2.0.0").digest() * 2048
        assert (root / "kiln-layers").is_file()
    assert not mounts_under(dev.root)
    assert not (dev.layers / ".work").exists() and not list(dev.layers.glob("*.tmp"))

    # Booted into 2.0.0 and blessed; the next release changes only the top layer, and deletes
    # a file of the base (an OCI whiteout) and hides a directory's content (an opaque directory).
    dev.boot("b", "kiln-2.0.0-b.conf", version="2.0.0")
    (dev.entries / "kiln-2.0.0-b+3.conf").rename(dev.entries / "kiln-2.0.0-b.conf")
    assert dev.agent("boot").returncode == 0
    before = layer_files(dev)
    world.release("2.1.0", "ch-layers", extra={"usr/share/base/.wh.old.conf": b"",
                                               "usr/share/base/dir/.wh..wh..opq": b"",
                                               "usr/share/base/dir/new": b"2.1.0\n"})
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert "layers: 1 built" in proc.stderr and "1 already on the device" in proc.stderr
    after = layer_files(dev)
    assert {k: v for k, v in after.items() if k in before} == before, "a layer on the device was rewritten"
    assert len(after) == 3, "the running slot's layers stay"
    with booted_root(dev, "a", world.tmp / "mnt-2.1.0") as root:
        assert json.loads((root / "usr/lib/kiln/release.json").read_text())["version"] == "2.1.0"
        assert not os.path.lexists(root / "usr/share/base/old.conf")
        assert sorted(os.listdir(root / "usr/share/base/dir")) == ["new"]
        assert (root / "usr/share/base/os.bin").read_bytes() == BASE["usr/share/base/os.bin"]
    with booted_root(dev, "b", world.tmp / "mnt-2.0.0-again") as root:  # the running slot still boots
        assert json.loads((root / "usr/lib/kiln/release.json").read_text())["version"] == "2.0.0"
        assert (root / "usr/share/base/old.conf").read_bytes() == b"removed by 2.1.0\n"


def test_an_interrupted_layered_update_resumes_and_leaves_nothing_mounted(world: World) -> None:
    world.release("3.0.0", "ch-layers-cut")
    dev = world.device("layers-cut", "ch-layers-cut")
    cut = dev.agent("update", "--no-reboot", env={"KILN_AGENT_FAULT": "after:built"})
    assert cut.returncode == 137, cut.stderr
    assert mounts_under(dev.root), "the killed run had the layers mounted"
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert "resuming the update to 3.0.0 after phase built" in proc.stderr
    assert "layers: 0 built" in proc.stderr
    assert not mounts_under(dev.root)
    assert (dev.entries / "kiln-3.0.0-b+3.conf").is_file()


def test_a_damaged_layer_is_built_again(world: World) -> None:
    """A layer whose file no longer measures as when it was made is never reused."""
    world.release("4.0.0", "ch-layers-bad")
    dev = world.device("layers-bad", "ch-layers-bad")
    assert dev.agent("update", "--no-reboot").returncode == 0
    victim = sorted(dev.layers.glob("*.erofs"))[0]
    verity = subprocess.run(["fsverity", "measure", str(victim)], capture_output=True, check=False)
    if verity.returncode == 0:
        pytest.skip("fs-verity is on here: the kernel refuses to change the file at all")
    with victim.open("r+b") as f:
        f.seek(0)
        f.write(b"\xff" * 512)
    dev.boot("a", "kiln-1.0.0-a.conf")
    world.release("4.0.1", "ch-layers-bad")
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert "building it again" in proc.stderr
    trust = dev.state()["slots"]["b"]
    with booted_root(dev, "b", world.tmp / "mnt-4.0.1") as root:
        assert json.loads((root / "usr/lib/kiln/release.json").read_text())["version"] == "4.0.1"
    assert len(trust["layers"]) == 2


def test_a_full_layer_store_fails_cleanly_and_the_retry_builds_it(world: World) -> None:
    """The data partition fills up while a layer is built: exit 8, the half-built layer (work tree,
    temporary file) goes, the running slot is untouched; with space back the update completes."""
    world.release("5.0.0", "ch-layers-full")
    dev = world.device("layers-full", "ch-layers-full")
    active = hashlib.sha256(dev.slot("a").read_bytes()).hexdigest()
    dev.layers.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "kiln-test-layers", str(dev.layers)], check=True)
    try:
        proc = dev.agent("update", "--no-reboot")
        assert proc.returncode == 8, proc.stderr
        assert "MiB free after removing the unpacked update" in proc.stderr and "Traceback" not in proc.stderr
        assert [p.name for p in dev.layers.iterdir() if not p.name.endswith((".erofs", ".verity"))] == []
        assert hashlib.sha256(dev.slot("a").read_bytes()).hexdigest() == active
        assert not dev.state()["slots"].get("b")
    finally:
        subprocess.run(["umount", str(dev.layers)], check=True)
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert (dev.entries / "kiln-5.0.0-b+3.conf").is_file()
