"""The real agent against a damaged device and a bad network: a layout index lost in a power
cut, a corrupt blob, a stalled registry, an image whose kernel links out of its tree, and what
the unpacked tree leaves on the data partition. Same harness as test_agent.py (tests/ota.py)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.integration import test_agent as base
from tests.netfault import FaultyLink
from tests.ota import KVER, FakeDevice, Symlink, make_oci_image, publish, release_files, release_labels

pytestmark = pytest.mark.integration

world = base.world  # a registry and signature server of this module's own
World = base.World
BASE_LAYER = {"usr/share/base/os.bin": b"base layer shared by every version\n" * 4096}  # as World.release


def release(world: World, version: str, channel: str, extra: Mapping[str, bytes | Symlink] | None = None) -> str:
    """Publish a tiny release with extra files (or links) on `channel`; its digest."""
    files: dict[str, bytes | Symlink] = {**release_files(version=version), **(extra or {})}
    make_oci_image(world.layout, version, files, release_labels(version=version), base=BASE_LAYER)
    return publish(world.registry, "kiln/tiny", world.layout, version, key=world.key, lookaside=world.lookaside,
                   cls="tiny", tags=(version, channel), state=world.state)


def configure(dev: FakeDevice, **keys: Any) -> None:
    path = dev.root / "usr/lib/kiln/agent.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))


def device(world: World, name: str, channel: str) -> FakeDevice:
    dev = world.device(name)
    configure(dev, channel=channel)
    return dev


def oci(dev: FakeDevice) -> Path:
    return dev.root / "var/lib/kiln/oci"


def layout_manifest(layout: Path, ref: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    [desc] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == ref]
    return dict(json.loads((layout / "blobs/sha256" / desc["digest"][7:]).read_text()))


def assert_installed(dev: FakeDevice, version: str, digest: str, slot: str = "b") -> None:
    """The slot holds what its trust record says, for `digest`, and the ESP has the image's kernel."""
    state = dev.state()
    assert state["pending"]["phase"] == "entry" and state["pending"]["digest"] == digest
    trust = state["slots"][slot]
    assert trust["digest"] == digest
    assert hashlib.sha256(dev.slot(slot).read_bytes()[:trust["size"]]).hexdigest() == trust["sha256"]
    assert (dev.esp / f"kiln/{slot}/vmlinuz").read_bytes() == f"kernel of {version}\n".encode()
    assert (dev.entries / f"kiln-{version}-{slot}+3.conf").is_file()


# --- finding 1: resume after a power cut with skopeo's index.json lost --------------------------


@pytest.mark.parametrize("damage", ["empty", "before-copy", "other-image"])
def test_resume_after_fetched_survives_a_lost_layout_index(world: World, damage: str) -> None:
    """Finding 1: the `fetched` phase was resumed from skopeo's index.json, written without fsync.
    A power cut can leave it empty (every later update died with JSONDecodeError), as it was before
    the copy (no image named <ref>), or naming another image under the ref (the wrong image was
    installed). The resumed update copies again and checks the layout names the candidate."""
    version, channel = {"empty": "4.1.0", "before-copy": "4.2.0", "other-image": "4.3.0"}[damage], f"ch-idx-{damage}"
    digest = release(world, version, channel)
    dev = device(world, f"idx-{damage}", channel)
    cut = dev.agent("update", "--no-reboot", env={"KILN_AGENT_FAULT": "after:fetched"})
    assert cut.returncode == 137, cut.stderr
    index = oci(dev) / "index.json"
    if damage == "empty":
        index.write_bytes(b"")
    elif damage == "before-copy":
        index.write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
    else:  # a stale entry: another image under the candidate's name, its blobs present
        make_oci_image(oci(dev), version, release_files(version="4.0.9"), release_labels(version="4.0.9"),
                       base=BASE_LAYER)
    dev.boot("a", "kiln-1.0.0-a.conf")
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming the update to {version} after phase fetched" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_installed(dev, version, digest)
    if damage == "empty":
        assert (oci(dev) / "index.json.corrupt").exists()
    # The layout is usable for the next update: the candidate is named by its digest.
    assert json.loads(index.read_text())["manifests"][-1]["digest"] == digest


# --- finding 2: a corrupt blob in the layout ------------------------------------------------------


def test_a_corrupt_shared_blob_is_fetched_again(world: World) -> None:
    """Finding 2: skopeo reuses any blob present in the layout, corrupt or not; umoci then refused
    every release sharing it, for good. The agent hashes the candidate's blobs, removes a corrupt
    one and fetches it again."""
    release(world, "5.0.0", "ch-corrupt")
    dev = device(world, "corrupt", "ch-corrupt")
    assert dev.agent("update", "--no-reboot").returncode == 0
    shared = layout_manifest(oci(dev), "5.0.0")["layers"][0]["digest"]
    blob = oci(dev) / "blobs/sha256" / shared[7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit flipped by a failing medium
    blob.write_bytes(bytes(data))
    digest = release(world, "5.1.0", "ch-corrupt")
    assert layout_manifest(world.layout, "5.1.0")["layers"][0]["digest"] == shared  # the base layer is shared
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert "do not match their digests" in proc.stderr
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == shared[7:]
    assert_installed(dev, "5.1.0", digest)


# --- finding 3: timeouts ----------------------------------------------------------------------------


def test_a_stalled_registry_times_out_and_releases_the_lock(world: World) -> None:
    """Finding 3: skopeo copy had no timeout; a registry that stalls held the agent's lock for an
    hour. Through a link throttled to a crawl, the fetch stops at timeouts.fetch with exit 7, the
    failure is the last result, and the next update runs."""
    payload = hashlib.sha256(b"incompressible").digest()
    payload = b"".join(hashlib.sha256(payload + i.to_bytes(4, "little")).digest() for i in range(2**16))  # 2 MiB
    digest = release(world, "6.0.0", "ch-stall", {"usr/share/kiln/big.bin": payload})
    with FaultyLink(world.registry, rate=32 * 1024) as link:  # 2 MiB takes a minute
        dev = device(world, "stall", "ch-stall")
        configure(dev, registry=f"127.0.0.1:{link.port}", timeouts={"fetch": 4})
        start = time.monotonic()
        proc = dev.agent("update", "--no-reboot")
        took = time.monotonic() - start
        assert proc.returncode == 7, proc.stderr
        assert took < 30, f"the update took {took:.0f} s"
        assert "skopeo timed out after 4 s (timeouts.fetch in the agent config)" in proc.stderr
        last = dev.status()["lastResult"]
        assert last["result"] == "failed" and last["code"] == 7 and "timed out" in last["reason"]
        link.restore(rate=None)
        again = dev.agent("update", "--no-reboot")
        assert again.returncode == 0, again.stderr
        assert_installed(dev, "6.0.0", digest)


def test_a_run_waits_for_the_lock_then_gives_up_with_exit_10(world: World) -> None:
    """Found on a booted device: `kiln-agent check` right after a boot failed at once with exit 10
    while kiln-agent-boot still held the lock for a few seconds. A run now waits for the lock, up to
    --lock-wait seconds (60 by default), then gives up with exit 10."""
    release(world, "6.5.0", "ch-lock")
    dev = device(world, "lock", "ch-lock")
    lock_file = dev.state_file.parent / ".lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        busy = dev.agent("--lock-wait", "1", "check")
        assert busy.returncode == 10, busy.stderr
        assert "another kiln-agent run holds" in busy.stderr and "(waited 1 s)" in busy.stderr, busy.stderr
        assert time.monotonic() - start >= 1
        threading.Timer(1.5, lambda: fcntl.flock(held, fcntl.LOCK_UN)).start()
        waited = dev.agent("check")  # the default wait
    assert waited.returncode == 0, waited.stderr
    assert "waiting up to 60 s" in waited.stderr and "update available" in waited.stdout
    bad = dev.agent("--lock-wait", "-1", "check")
    assert bad.returncode == 64 and "'-1' is not a number of seconds" in bad.stderr, bad.stderr


@pytest.mark.parametrize(("step", "tool", "version"), [("unpack", "umoci", "6.1.0"), ("build", "mkfs.erofs", "6.2.0")])
def test_unpack_and_build_time_out(world: World, tmp_path: Path, step: str, tool: str, version: str) -> None:
    """Finding 3 (and 5): umoci and mkfs.erofs run under timeouts.unpack and timeouts.build; a tool
    that hangs is killed there, the update fails with exit 9, the tree is removed, and the next run
    (the real tool) completes."""
    digest = release(world, version, f"ch-slow-{step}")
    dev = device(world, f"slow-{step}", f"ch-slow-{step}")
    configure(dev, timeouts={step: 2})
    hung = tmp_path / "bin" / tool
    hung.parent.mkdir()
    hung.write_text("#!/bin/sh\nexec sleep 120\n")  # exec: the process killed at the timeout is the sleep
    hung.chmod(0o755)
    start = time.monotonic()
    proc = dev.agent("update", "--no-reboot", env={"PATH": f"{hung.parent}:{os.environ['PATH']}"})
    assert proc.returncode == 9, proc.stderr
    assert time.monotonic() - start < 60
    assert f"{tool} timed out after 2 s (timeouts.{step} in the agent config)" in proc.stderr, proc.stderr
    assert dev.status()["lastResult"]["code"] == 9
    assert not (dev.root / "var/lib/kiln/work/rootfs").exists()
    configure(dev, timeouts={})
    again = dev.agent("update", "--no-reboot")
    assert again.returncode == 0, again.stderr
    assert_installed(dev, version, digest)


def test_bad_timeouts_are_a_config_error(world: World) -> None:
    """Finding 3: timeouts are checked when the config is read; an override sets one key and the
    others keep their defaults."""
    dev = device(world, "timeouts", "stable")
    configure(dev, timeouts={"fetch": 0})
    proc = dev.agent("check")
    assert proc.returncode == 11 and "timeouts.fetch" in proc.stderr, proc.stderr
    configure(dev, timeouts={"fecth": 10})
    proc = dev.agent("check")
    assert proc.returncode == 11 and "timeouts: unknown key fecth" in proc.stderr, proc.stderr


# --- finding 4: links in the image resolve inside the image -----------------------------------------


@pytest.mark.parametrize(("name", "target"), [
    ("vmlinuz", "/etc/hostname"),
    ("vmlinuz", "../" * 40 + "etc/hostname"),
    ("initramfs.img", "/etc/hostname"),
])
def test_kernel_links_resolve_inside_the_image(world: World, name: str, target: str) -> None:
    """Finding 4: check_tree followed an absolute link into the live root; an image whose vmlinuz
    linked to /etc/hostname installed the device's own /etc/hostname as its kernel. Links resolve
    as in a chroot: absolute targets start at the tree, `..` stops at its root."""
    version = {("vmlinuz", "/etc/hostname"): "7.1.0", ("initramfs.img", "/etc/hostname"): "7.3.0"}.get(
        (name, target), "7.2.0")
    channel = f"ch-link-{version}"
    inside = f"the image's own hostname file, {version}\n".encode()
    digest = release(world, version, channel, {f"usr/lib/modules/{KVER}/{name}": Symlink(target),
                                               "etc/hostname": inside})
    dev = device(world, f"link-{version}", channel)
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert (dev.esp / "kiln/b" / name).read_bytes() == inside
    assert dev.state()["slots"]["b"]["digest"] == digest


def test_a_kernel_that_is_not_a_regular_file_is_refused(world: World) -> None:
    """Finding 4 (and 5 on a failure path): a vmlinuz that resolves to a directory is refused
    before anything is installed, and the unpacked tree is removed."""
    release(world, "7.9.0", "ch-link-dir", {f"usr/lib/modules/{KVER}/vmlinuz": Symlink("/usr/share")})
    dev = device(world, "link-dir", "ch-link-dir")
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode not in (0, 1), proc.stderr
    assert "vmlinuz is not a regular file" in proc.stderr, proc.stderr
    assert not (dev.esp / "kiln").exists()
    assert sorted(p.name for p in dev.entries.iterdir()) == ["kiln-1.0.0-a.conf"]
    assert_private_and_empty(dev.root / "var/lib/kiln/work")


# --- finding 5: the work directory ------------------------------------------------------------------


def assert_private_and_empty(work: Path) -> None:
    assert stat.S_IMODE(work.stat().st_mode) == 0o700, oct(work.stat().st_mode)
    assert not (work / "rootfs").exists(), list((work / "rootfs").iterdir())


def test_the_work_dir_is_private_and_keeps_no_tree(world: World) -> None:
    """Finding 5: /var/lib/kiln/work was 0755 on a data partition without nosuid,nodev, holding
    the image's unpacked tree (setuid files, device nodes) during and after updates. The agent
    makes it 0700 (an existing 0755 one too) and removes the tree, after a success and a failure."""
    release(world, "8.0.0", "ch-work")
    dev = device(world, "work", "ch-work")
    work = dev.root / "var/lib/kiln/work"
    work.mkdir(parents=True, mode=0o755)
    os.chmod(work, 0o755)  # as an older agent and tmpfiles.d made it
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert_private_and_empty(work)
    # A failure after the unpack: the slot cannot be opened for writing.
    os.chmod(work, 0o755)
    release(world, "8.1.0", "ch-work")
    dev.slot("b").unlink()
    dev.slot("b").mkdir()
    failed = dev.agent("update", "--no-reboot")
    assert failed.returncode == 9, failed.stderr
    assert dev.status()["lastResult"]["result"] == "failed"
    assert_private_and_empty(work)
