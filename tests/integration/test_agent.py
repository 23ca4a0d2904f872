"""The real device agent against a real registry and signature server on 127.0.0.1.

The device is a temp directory (tests/ota.py FakeDevice): ESP, /var/lib/kiln and two slot
image FILES in place of the root partitions. Images are tiny Kiln-shaped OCI images,
signed and promoted the way `kiln release` does it (builder.release.signing). The agent runs as a
subprocess with real skopeo (policy.json with signedBy), umoci and mkfs.erofs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.core.state import StateDir
from builder.keys.release_key import SigningKey, make_signing_key
from tests.ota import FakeDevice, make_oci_image, ota_services, publish, push_unsigned, release_files, release_labels

pytestmark = pytest.mark.integration

EXIT = {"ok": 0, "up-to-date": 2, "incompatible": 3, "not-newer": 4, "blocklisted": 5, "signature": 6}


@dataclass
class World:
    registry: str
    registry_log: Path
    lookaside: Path
    lookaside_url: str
    key: SigningKey
    other_key: SigningKey
    state: StateDir
    layout: Path
    tmp: Path

    def release(self, version: str, tags: tuple[str, ...] = ("stable",), *, compatible: str = "kiln,tiny",
                key: SigningKey | None = None, min_version: str | None = None, kernel: bytes | None = None) -> str:
        make_oci_image(self.layout, version, release_files(version=version, compatible=compatible,
                                                           min_version=min_version, kernel=kernel),
                       release_labels(version=version, compatible=compatible, min_version=min_version),
                       base={"usr/share/base/os.bin": b"base layer shared by every version\n" * 4096})
        return publish(self.registry, "kiln/tiny", self.layout, version, key=key or self.key,
                       lookaside=self.lookaside, cls="tiny", tags=(version, *tags), state=self.state)

    def device(self, name: str = "dev", channel: str | None = None) -> FakeDevice:
        """A fake device running 1.0.0; with CHANNEL, following that channel (its image's agent.json)."""
        dev = FakeDevice.create(self.tmp / name, registry=self.registry, lookaside=self.lookaside_url, key=self.key)
        if channel is not None:
            config = json.loads((dev.root / "usr/lib/kiln/agent.json").read_text())
            config["channel"] = channel
            (dev.root / "usr/lib/kiln/agent.json").write_text(json.dumps(config))
        return dev


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("ota")
    with ota_services(tmp) as s:
        other = make_signing_key(tmp / "other-key")
        yield World(s.registry, s.registry_log, s.lookaside, s.lookaside_url, s.key, other, s.state, tmp / "oci", tmp)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_offers_a_newer_signed_release(world: World) -> None:
    world.release("1.1.0")
    dev = world.device("check")
    proc = dev.agent("check", "--json")
    assert proc.returncode == EXIT["ok"], proc.stderr
    data = json.loads(proc.stdout)
    assert data["take"] and data["candidate"]["version"] == "1.1.0"


@pytest.mark.parametrize(("what", "expected"), [
    ("wrong-compatible", "incompatible"),
    ("older", "not-newer"),
    ("same", "up-to-date"),
    ("blocklisted", "blocklisted"),
    ("unsigned", "signature"),
    ("other-key", "signature"),
    ("moved-signature", "signature"),
])
def test_update_refuses_before_writing_anything(world: World, what: str, expected: str) -> None:
    channel = f"ch-{what}"
    if what == "wrong-compatible":
        world.release("9.0.0", (channel,), compatible="kiln,other-class")
    elif what == "older":
        world.release("0.9.0", (channel,))
    elif what == "same":
        world.release("1.0.0", (channel,))
    elif what == "blocklisted":
        world.release("1.2.0", (channel,))
    elif what == "unsigned":
        make_oci_image(world.layout, "5.0.0", release_files(version="5.0.0"), release_labels(version="5.0.0"))
        push_unsigned(world.registry, "kiln/tiny", world.layout, "5.0.0", channel, world.state)
    elif what == "other-key":
        world.release("5.1.0", (channel,), key=world.other_key)
    elif what == "moved-signature":
        # A real signature of a good release, copied next to another manifest's digest.
        good = world.release("5.2.0", ("ch-good",))
        make_oci_image(world.layout, "5.3.0", release_files(version="5.3.0"), release_labels(version="5.3.0"))
        bad = push_unsigned(world.registry, "kiln/tiny", world.layout, "5.3.0", channel, world.state)
        src = world.lookaside / f"kiln/tiny@sha256={good.split(':')[1]}"
        shutil.copytree(src, world.lookaside / f"kiln/tiny@sha256={bad.split(':')[1]}", dirs_exist_ok=True)
    dev = world.device(f"refuse-{what}", channel=channel)
    if what == "blocklisted":
        dev.state_file.parent.mkdir(parents=True)
        dev.state_file.write_text(json.dumps({"schema": 1, "pending": None, "slots": {}, "lastResult": None,
                                              "rollbacks": [], "blocklist": ["1.2.0"]}))
    before = {s: sha(dev.slot(s)) for s in "ab"}
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT[expected], proc.stderr
    assert {s: sha(dev.slot(s)) for s in "ab"} == before
    assert sorted(p.name for p in dev.entries.iterdir()) == ["kiln-1.0.0-a.conf"]
    assert not (dev.esp / "kiln").exists()


def test_update_writes_only_the_inactive_slot_then_boot_blesses_it(world: World) -> None:
    digest = world.release("2.0.0")
    dev = world.device("update")
    active = sha(dev.slot("a"))
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert sha(dev.slot("a")) == active
    state = dev.state()
    assert state["pending"]["phase"] == "entry" and state["pending"]["digest"] == digest
    trust = state["slots"]["b"]
    size = trust["size"]
    assert hashlib.sha256(dev.slot("b").read_bytes()[:size]).hexdigest() == trust["sha256"]
    assert dev.slot("b").read_bytes()[1024:1028] == (0xE0F5E1E2).to_bytes(4, "little")  # erofs
    assert (dev.esp / "kiln/b/vmlinuz").read_bytes() == b"kernel of 2.0.0\n"
    entry = dev.entries / "kiln-2.0.0-b+3.conf"
    text = entry.read_text()
    assert "options root=PARTUUID=22222222-2222-2222-2222-222222222222 ro rootfstype=erofs kiln.slot=b " \
           "console=ttyS0,115200n8 panic=10" in text
    assert "linux /kiln/b/vmlinuz" in text
    # Same boot: a second run neither rolls back nor reinstalls.
    again = dev.agent("update", "--no-reboot")
    assert again.returncode == 0, again.stderr
    assert dev.state()["pending"]["phase"] == "entry" and not dev.state()["rollbacks"]
    # Reboot into the trial entry: not blessed yet -> waiting; blessed -> success.
    dev.boot("b", "kiln-2.0.0-b+2-1.conf", version="2.0.0")
    entry.rename(dev.entries / "kiln-2.0.0-b+2-1.conf")
    assert dev.agent("boot").returncode == 0
    assert dev.state()["pending"] is not None
    (dev.entries / "kiln-2.0.0-b+2-1.conf").rename(dev.entries / "kiln-2.0.0-b.conf")
    proc = dev.agent("boot")
    assert proc.returncode == 0, proc.stderr
    status = dev.status()
    assert status["version"] == "2.0.0" and status["bootedSlot"] == "b"
    assert status["pending"] is None and status["lastResult"]["result"] == "success"
    assert dev.agent("check").returncode == EXIT["up-to-date"]
    # Only the running image stays in the OCI layout after the next update; blobs are shared.
    oci = json.loads((dev.root / "var/lib/kiln/oci/index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in oci["manifests"]] == ["2.0.0"]


def test_rollback_is_recorded_and_blocklisted(world: World) -> None:
    world.release("3.0.0", ("ch-rollback",))
    dev = world.device("rollback", channel="ch-rollback")
    assert dev.agent("update", "--no-reboot").returncode == 0
    # Tries used up: systemd-boot fell back to slot a (the old entry).
    (dev.entries / "kiln-3.0.0-b+3.conf").rename(dev.entries / "kiln-3.0.0-b+0-3.conf")
    dev.boot("a", "kiln-1.0.0-a.conf")
    proc = dev.agent("boot")
    assert proc.returncode == 0, proc.stderr
    status = dev.status()
    assert status["lastResult"]["result"] == "rolled-back"
    assert status["rollbacks"][-1]["version"] == "3.0.0" and "3.0.0" in status["blocklist"]
    assert sorted(p.name for p in dev.entries.iterdir()) == ["kiln-1.0.0-a.conf"]
    check = dev.agent("check")
    assert check.returncode == EXIT["blocklisted"], check.stderr
    text = dev.agent("status").stdout
    assert "rollback: 3.0.0 (slot b)" in text


def test_no_update_writes_the_fallback_slot_while_the_running_one_is_on_trial(world: World) -> None:
    """Finding (issue 33, 4): `update` during a trial boot that was not blessed yet wrote the other slot, the
    one the trial falls back to, and removed its entry: a failed trial then had nothing to go back to. It waits
    (exit 14) until the trial is blessed, and then updates that slot."""
    world.release("7.0.0", ("ch-trial",))
    dev = world.device("trial", channel="ch-trial")
    assert dev.agent("update", "--no-reboot").returncode == 0
    (dev.entries / "kiln-7.0.0-b+3.conf").rename(dev.entries / "kiln-7.0.0-b+2-1.conf")
    dev.boot("b", "kiln-7.0.0-b+2-1.conf", version="7.0.0")
    assert dev.agent("boot").returncode == 0
    world.release("7.1.0", ("ch-trial",))
    good = sha(dev.slot("a"))
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 14, proc.stderr
    assert "this boot is the trial of 7.0.0 in slot b" in proc.stderr and "not blessed" in proc.stderr
    assert sha(dev.slot("a")) == good
    assert sorted(p.name for p in dev.entries.iterdir()) == ["kiln-1.0.0-a.conf", "kiln-7.0.0-b+2-1.conf"]
    # Blessed: the update goes to slot a.
    (dev.entries / "kiln-7.0.0-b+2-1.conf").rename(dev.entries / "kiln-7.0.0-b.conf")
    assert dev.agent("boot").returncode == 0
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dev.entries.iterdir()) == ["kiln-7.0.0-b.conf", "kiln-7.1.0-a+3.conf"]


@pytest.mark.parametrize("phase", ["fetched", "invalidated", "built", "written", "verified", "kernel"])
def test_interrupted_update_resumes(world: World, phase: str) -> None:
    world.release("4.0.0", ("ch-resume",))
    dev = world.device(f"resume-{phase}", channel="ch-resume")
    active = sha(dev.slot("a"))
    cut = dev.agent("update", "--no-reboot", env={"KILN_AGENT_FAULT": f"after:{phase}"})
    assert cut.returncode == 137, cut.stderr
    assert not any(p.name.startswith("kiln-4.0.0") for p in dev.entries.iterdir())  # nothing boots it yet
    if phase == "written":
        # Power cut mid-write: the slot holds garbage. It has no verification record, so it is redone.
        with dev.slot("b").open("r+b") as f:
            f.seek(4096)
            f.write(b"torn write" * 100)
    dev.boot("a", "kiln-1.0.0-a.conf")  # the power came back: same slot, new boot
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming the update to 4.0.0 after phase {phase}" in proc.stderr
    state = dev.state()
    assert state["pending"]["phase"] == "entry"
    trust = state["slots"]["b"]
    assert hashlib.sha256(dev.slot("b").read_bytes()[:trust["size"]]).hexdigest() == trust["sha256"]
    assert sha(dev.slot("a")) == active
    assert (dev.entries / "kiln-4.0.0-b+3.conf").is_file()


def test_only_missing_blobs_are_fetched(world: World) -> None:
    world.release("6.0.0", ("ch-delta",))
    dev = world.device("delta", channel="ch-delta")
    assert dev.agent("update", "--no-reboot").returncode == 0
    dev.boot("b", "kiln-6.0.0-b.conf", version="6.0.0")
    (dev.entries / "kiln-6.0.0-b+3.conf").rename(dev.entries / "kiln-6.0.0-b.conf")
    assert dev.agent("boot").returncode == 0
    world.release("6.1.0", ("ch-delta",))
    mark = world.registry_log.stat().st_size
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 0, proc.stderr
    log = world.registry_log.read_text()[mark:]
    fetched = set(re.findall(r'"GET /v2/kiln/tiny/blobs/(sha256:[0-9a-f]{64})', log))
    base_layer = json.loads((dev.root / "var/lib/kiln/oci/index.json").read_text())
    assert len(fetched) == 2, fetched  # the new config and the new top layer; the base layer stayed
    assert base_layer["manifests"]
    assert (dev.entries / "kiln-6.1.0-a+3.conf").is_file()  # slot a this time: b is running


def test_status_and_self_test(world: World) -> None:
    dev = world.device("status")
    text = dev.agent("status")
    assert text.returncode == 0 and "tiny 1.0.0 from slot a (entry kiln-1.0.0-a.conf" in text.stdout
    assert dev.agent("self-test").returncode == 0
    assert dev.agent("bogus").returncode == 64


def test_power_cut_mid_slot_write(world: World) -> None:
    """Stopped half way through writing slot B and killed: slot A and the entries are untouched,
    the torn slot is never trusted, and the next run writes it again and completes."""
    world.release("7.0.0", ("ch-torn",))
    dev = world.device("torn", channel="ch-torn")
    active, entries = sha(dev.slot("a")), sorted(p.name for p in dev.entries.iterdir())
    empty_b = sha(dev.slot("b"))
    leftover = dev.root / "var/lib/kiln/oci/oci-put-blob123456"  # skopeo's temp file from a download cut short
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial layer" * 1000)
    mark = dev.root / "fault"
    env = {**os.environ, "KILN_AGENT_ROOT": str(dev.root), "KILN_AGENT_FAULT": "stop:writing",
           "KILN_AGENT_FAULT_MARK": str(mark)}
    proc = subprocess.Popen([*dev.agent_argv(), "update", "--no-reboot"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mark.read_text() == "writing\n", proc.stderr.read().decode() if proc.stderr else ""
    proc.kill()
    proc.wait()
    assert not leftover.exists()
    assert sha(dev.slot("b")) != empty_b  # half of the new filesystem reached the slot
    assert sha(dev.slot("a")) == active
    assert sorted(p.name for p in dev.entries.iterdir()) == entries  # nothing boots slot B
    state = dev.state()
    assert state["pending"]["phase"] == "built" and state["slots"]["b"] is None
    dev.boot("a", "kiln-1.0.0-a.conf")
    again = dev.agent("update", "--no-reboot")
    assert again.returncode == 0, again.stderr
    assert "resuming the update to 7.0.0 after phase built" in again.stderr
    trust = dev.state()["slots"]["b"]
    assert hashlib.sha256(dev.slot("b").read_bytes()[:trust["size"]]).hexdigest() == trust["sha256"]
    assert (dev.entries / "kiln-7.0.0-b+3.conf").is_file()


def test_full_data_partition_fails_cleanly_and_retry_works(world: World) -> None:
    """/var/lib/kiln on a nearly full 4 MiB tmpfs: the update stops with exit 8 and says how much is
    free, removes its half-unpacked tree, keeps the downloaded blobs; with space back, it completes
    without downloading them again."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    world.release("8.0.0", ("ch-full",))
    dev = world.device("full", channel="ch-full")
    data = dev.root / "var/lib/kiln"
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "kiln-test-data", str(data)], check=True)
    try:
        filler = data / "filler"
        with filler.open("wb") as f:
            f.truncate(0)
            f.write(b"\0" * (shutil.disk_usage(data).free - 160 * 1024))
        active = sha(dev.slot("a"))
        proc = dev.agent("update", "--no-reboot")
        assert proc.returncode == 8, proc.stderr
        assert "MiB free after removing the unpacked update" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (data / "work/rootfs").exists() and not (data / "work/root.erofs").exists()
        status = dev.status()
        assert status["lastResult"]["result"] == "failed" and status["lastResult"]["code"] == 8
        assert status["pending"]["phase"] == "fetched"  # unpacking (the checks) comes before the slot is touched
        assert sha(dev.slot("a")) == active
        filler.unlink()
        mark = world.registry_log.stat().st_size
        again = dev.agent("update", "--no-reboot")
        assert again.returncode == 0, again.stderr
        log = world.registry_log.read_text()[mark:]
        fetched = set(re.findall(r'"GET /v2/kiln/tiny/blobs/(sha256:[0-9a-f]{64})', log))
        index = json.loads((data / "oci/index.json").read_text())
        manifest = json.loads((data / "oci/blobs/sha256" / index["manifests"][-1]["digest"][7:]).read_text())
        assert fetched <= {manifest["config"]["digest"]}, fetched  # `check` reads the labels; no layer again
        assert (dev.entries / "kiln-8.0.0-b+3.conf").is_file()
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
