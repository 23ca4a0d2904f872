"""Trusted channels (issue 13): the real agent, real python-tuf metadata served over HTTP beside the
signatures, a real registry, each attack of the issue refused with nothing written to a slot.

The repository is builder.release.trust's (what `kiln channel` and `kiln release` write); the device is a
FakeDevice whose image carries the repository's root (tests/ota.py). The registry's tags are set
by the attacker in several tests: with a TUF root the agent never reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, TargetFile, Timestamp

from builder.core.state import StateDir
from builder.keys.release_key import SigningKey
from builder.keys.tuf_keys import TrustKeys, make_trust_keys, trust_root
from builder.release.trust import Release, Repository
from kiln_device import contract
from tests.ota import FakeDevice, make_oci_image, ota_services, publish, release_files, release_labels

pytestmark = pytest.mark.integration

EXIT = {"ok": 0, "up-to-date": 2, "incompatible": 3, "not-newer": 4, "signature": 6, "unreachable": 7, "stale": 13}
CLS = "tiny"


@dataclass
class World:
    registry: str
    registry_log: Path
    lookaside: Path
    lookaside_url: str
    key: SigningKey
    trust_keys: Path
    state: StateDir
    layout: Path
    tmp: Path

    @property
    def repo(self) -> Repository:
        return Repository(self.lookaside / "tuf", TrustKeys.load(self.trust_keys))

    @property
    def meta(self) -> Path:
        return self.lookaside / "tuf" / "metadata"

    def push(self, version: str, tags: tuple[str, ...] = (), *, compatible: str = "kiln,tiny") -> str:
        """A signed image (simple signing, as `kiln release` pushes it); not yet in the channel."""
        make_oci_image(self.layout, version, release_files(version=version, compatible=compatible),
                       release_labels(version=version, compatible=compatible),
                       base={"usr/share/base/os.bin": b"base layer shared by every version\n" * 4096})
        return publish(self.registry, f"kiln/{CLS}", self.layout, version, key=self.key, lookaside=self.lookaside,
                       cls=CLS, tags=(version, *tags), state=self.state)

    def release(self, version: str, channel: str = "stable", *, compatible: str = "kiln,tiny") -> str:
        """Push, then name it in the channel's TUF targets (what `kiln release` does)."""
        digest = self.push(version, compatible=compatible)
        raw = manifest_bytes(self.registry, digest)
        self.repo.publish(Release(CLS, channel, version, digest, len(raw), compatible))
        return digest

    def device(self, name: str, *, version: str = "1.0.0", channel: str = "stable") -> FakeDevice:
        dev = FakeDevice.create(self.tmp / name, registry=self.registry, lookaside=self.lookaside_url, key=self.key,
                                version=version, trust_root=(self.meta / "1.root.json").read_bytes())
        config_file = dev.root / "usr/lib/kiln/agent.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "channel": channel}))
        return dev


def manifest_bytes(registry: str, digest: str) -> bytes:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry}/kiln/{CLS}@{digest}"], capture_output=True, check=True).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    return raw


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("tuf")
    with ota_services(tmp) as s:
        make_trust_keys(tmp / "key")
        Repository(s.lookaside / "tuf", TrustKeys.load(tmp / "key")).init(trust_root(tmp / "key") or b"")
        yield World(s.registry, s.registry_log, s.lookaside, s.lookaside_url, s.key, tmp / "key", s.state, tmp / "oci",
                    tmp)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def slots(dev: FakeDevice) -> dict[str, str]:
    return {s: sha(dev.slot(s)) for s in "ab"}


def refused(dev: FakeDevice, code: str, *, says: str) -> None:
    """An update refused with CODE, naming SAYS, and nothing written: slots, entries, ESP."""
    before, entries = slots(dev), sorted(p.name for p in dev.entries.iterdir())
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT[code], proc.stderr
    assert says in proc.stderr, proc.stderr
    assert slots(dev) == before
    assert sorted(p.name for p in dev.entries.iterdir()) == entries
    assert not (dev.esp / "kiln").exists()


@contextlib.contextmanager
def served_as_is(world: World) -> Iterator[None]:
    """Whatever a test does to the served metadata is undone after it."""
    saved = world.tmp / "metadata-saved"
    shutil.rmtree(saved, ignore_errors=True)
    shutil.copytree(world.meta, saved)
    try:
        yield
    finally:
        shutil.rmtree(world.meta)
        shutil.copytree(saved, world.meta)


def test_a_device_updates_to_what_the_signed_channel_names(world: World) -> None:
    digest = world.release("1.1.0")
    dev = world.device("update")
    active = sha(dev.slot("a"))
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr
    assert sha(dev.slot("a")) == active and sha(dev.slot("b")) != sha(dev.slot("a"))
    st = dev.state()
    assert st["pending"]["digest"] == digest and st["pending"]["version"] == "1.1.0"
    assert st["trust"]["status"] == "fresh" and st["trust"]["newest"] == "1.1.0"
    assert (dev.root / "var/lib/kiln/tuf/metadata/targets.json").is_file()  # the trusted copy, on the data partition


def test_an_override_naming_a_missing_tuf_root_refuses_instead_of_trusting_tags(world: World) -> None:
    """Finding (issue 33, 7): /etc/kiln/agent.json naming a trustRoot that is not there made the agent read the
    channel by tags and signatures alone, the weaker check, without a word. It refuses (configuration, 11)."""
    world.release("1.1.0")
    dev = world.device("bad-root")
    override = contract.under(dev.root, contract.AGENT_OVERRIDE_JSON)
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text(json.dumps({"trustRoot": str(dev.root / "etc/kiln/tuf-root.json")}))
    before = slots(dev)
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == 11, proc.stderr
    assert "trustRoot" in proc.stderr and "is not a file" in proc.stderr, proc.stderr
    assert slots(dev) == before
    override.write_text(json.dumps({"trustRoot": str(contract.under(dev.root, contract.TRUST_ROOT))}))
    assert dev.agent("update", "--no-reboot").returncode == EXIT["ok"]


def test_an_update_downloads_each_blob_once(world: World) -> None:
    """Issue 18: the manifest and the config are read once, by the copy (no inspect before it), and only
    the layers the device lacks: bytes over the wire equal the changed blobs, nothing more."""
    world.release("5.0.0", "ch-once")
    dev = world.device("once", channel="ch-once")
    assert dev.agent("update", "--no-reboot").returncode == EXIT["ok"]
    old = dev.state()["pending"]["digest"]
    digest = world.release("5.1.0", "ch-once")
    dev.boot("b", "kiln-5.0.0-b.conf", version="5.0.0")
    (dev.entries / "kiln-5.0.0-b+3.conf").rename(dev.entries / "kiln-5.0.0-b.conf")
    assert dev.agent("boot").returncode == EXIT["ok"]
    mark = world.registry_log.stat().st_size
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr
    gets = [(m.group(1), int(m.group(2))) for m in re.finditer(
        r'"GET (/v2/kiln/tiny/(?:manifests|blobs)/sha256:[0-9a-f]{64}) HTTP/[0-9.]+" 200 (\d+)',
        world.registry_log.read_text()[mark:])]
    paths = [p for p, _ in gets]
    assert len(paths) == len(set(paths)), f"fetched more than once: {paths}"
    new, before = json.loads(manifest_bytes(world.registry, digest)), json.loads(manifest_bytes(world.registry, old))
    have = {la["digest"] for la in before["layers"]}
    floor = len(manifest_bytes(world.registry, digest)) + new["config"]["size"] + \
        sum(la["size"] for la in new["layers"] if la["digest"] not in have)
    assert sum(n for _, n in gets) == floor


def test_a_signed_image_the_channel_does_not_name_is_never_installed(world: World) -> None:
    """The registry's owner moves :stable (and :beta) to a newer build the release key signed, an aborted
    or test build: with a TUF root the tag is never read."""
    world.release("1.1.0")  # the same bytes again: the same digest, accepted
    world.push("7.0.0", ("stable", "beta"))  # signed, tagged, never released
    dev = world.device("tag-moved")
    proc = dev.agent("check", "--json")
    assert proc.returncode == EXIT["ok"], proc.stderr
    assert json.loads(proc.stdout)["candidate"]["version"] == "1.1.0"
    beta = world.device("other-channel", channel="beta")  # nothing was released on beta
    refused(beta, "incompatible", says="names no release compatible with kiln,tiny")


def test_a_frozen_channel_is_stale_never_up_to_date(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = world.device("freeze", version="1.1.0")
    assert dev.agent("check").returncode == EXIT["up-to-date"]
    with served_as_is(world):
        monkeypatch.setenv("KILN_TUF_EXPIRY", "timestamp=1")
        world.repo.refresh()  # a timestamp that expires in a second, then served forever
        time.sleep(2.5)
        refused(dev, "stale", says="has expired")
        st = dev.status()
        assert st["trust"]["status"] == "stale" and st["trust"]["staleSince"]
        health = dev.agent("self-test")  # reported in the health check, which still passes (no rollback)
        assert health.returncode == 0 and "the channel's metadata is stale since" in health.stderr, health.stderr
    monkeypatch.delenv("KILN_TUF_EXPIRY")
    world.repo.refresh()  # the online key signs a fresh timestamp: the device is current again
    assert dev.agent("check").returncode == EXIT["up-to-date"]
    assert dev.status()["trust"]["status"] == "fresh"


def test_replayed_old_metadata_is_refused(world: World) -> None:
    dev = world.device("replay")
    old = (world.meta / "timestamp.json").read_bytes()
    world.repo.refresh()
    assert dev.agent("check").returncode in (EXIT["ok"], EXIT["up-to-date"])  # it has seen the newer timestamp
    with served_as_is(world):
        (world.meta / "timestamp.json").write_bytes(old)
        refused(dev, "signature", says="BadVersionNumberError")


def test_mixed_metadata_versions_are_refused(world: World) -> None:
    """A fresh timestamp names snapshot N; the server hands out snapshot N-1's content under N's name."""
    dev = world.device("mix")
    with served_as_is(world):
        world.repo.refresh()
        snaps = sorted(world.meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))
        snaps[-1].write_bytes(snaps[-2].read_bytes())
        refused(dev, "signature", says="snapshot")


def test_a_withdrawn_release_is_never_installed_and_its_devices_move_on(world: World) -> None:
    world.release("3.0.0", "wd")
    world.release("3.1.0", "wd")
    world.repo.withdraw(CLS, "wd", "3.1.0", "corrupts the model cache")
    fresh = world.device("withdrawn-new", channel="wd")
    proc = fresh.agent("check", "--json")
    assert proc.returncode == EXIT["ok"], proc.stderr
    assert json.loads(proc.stdout)["candidate"]["version"] == "3.0.0"
    running = world.device("withdrawn-running", version="3.1.0", channel="wd")
    refused_ok = running.agent("check")
    assert refused_ok.returncode == EXIT["not-newer"], refused_ok.stderr  # nothing newer yet: it stays
    assert "was withdrawn (corrupts the model cache)" in refused_ok.stderr
    world.release("3.1.1", "wd")
    proc = running.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr
    assert running.state()["pending"]["version"] == "3.1.1"
    assert running.status()["trust"]["runningWithdrawn"]["reason"] == "corrupts the model cache"


def test_a_compromised_online_key_alone_cannot_name_a_digest(world: World) -> None:
    """The attacker holds the online (snapshot + timestamp) key and signs metadata that points at a
    targets file of their own: the targets role's signature does not verify."""
    attacker_digest = world.push("8.0.0")
    dev = world.device("online-key")
    online = TrustKeys.load(world.trust_keys).signers["online"]
    forger = CryptoSigner.generate_ed25519()
    with served_as_is(world):
        forge_targets(world, attacker_digest, signer=forger, online=online)
        refused(dev, "signature", says="targets")


def forge_targets(world: World, digest: str, *, signer: Signer, online: Signer) -> None:
    """Targets N+1 naming DIGEST as tiny/stable/8.0.0, signed by SIGNER; snapshot and timestamp to match,
    signed with the online key."""
    repo = world.repo
    targets = repo.latest("targets")
    targets.signed.version += 1
    raw = manifest_bytes(world.registry, digest)
    targets.signed.targets["tiny/stable/8.0.0"] = TargetFile(
        len(raw), {"sha256": digest.removeprefix("sha256:")}, "tiny/stable/8.0.0",
        unrecognized_fields={"custom": {"version": "8.0.0", "compatible": "kiln,tiny"}})
    targets.sign(signer, append=False)
    (world.meta / f"{targets.signed.version}.targets.json").write_bytes(targets.to_bytes())
    snap = repo.latest("snapshot")
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
    snap.sign(online, append=False)
    (world.meta / f"{snap.signed.version}.snapshot.json").write_bytes(snap.to_bytes())
    ts: Metadata[Timestamp] = Metadata.from_file(str(world.meta / "timestamp.json"))
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
    ts.sign(online, append=False)
    (world.meta / "timestamp.json").write_bytes(ts.to_bytes())


def test_devices_follow_a_key_rotation_without_reflashing(world: World) -> None:
    dev = world.device("rotation")
    assert dev.agent("check").returncode in (EXIT["ok"], EXIT["up-to-date"])
    new_keys = world.tmp / "new-targets-key"
    make_trust_keys(new_keys)
    old_targets = TrustKeys.load(world.trust_keys).signers["targets"]
    version = world.repo.rotate("targets", TrustKeys.load(new_keys))
    shutil.copy(new_keys / "tuf" / "targets.pem", world.trust_keys / "tuf" / "targets.pem")  # the new release key
    world.release("4.0.0", "rotated")
    rotated = world.device("rotation-2", channel="rotated")  # flashed with root v1, like every device
    proc = rotated.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr
    assert rotated.state()["trust"]["rootVersion"] == version == 2
    # The old targets key (lost, leaked) signs nothing any device accepts any more.
    attacker_digest = world.push("8.0.0")
    with served_as_is(world):
        online = TrustKeys.load(world.trust_keys).signers["online"]
        forge_targets(world, attacker_digest, signer=old_targets, online=online)
        refused(world.device("rotation-3"), "signature", says="targets")


def test_an_expired_root_is_stale(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = world.device("expired-root")
    with served_as_is(world):
        monkeypatch.setenv("KILN_TUF_EXPIRY", "root=1")
        world.repo.rotate("online", TrustKeys.load(world.trust_keys))  # root N+1, expiring in a second
        time.sleep(2.5)
        refused(dev, "stale", says="expired")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "oversized", "missing"])
def test_corrupt_truncated_oversized_metadata_is_refused_and_a_retry_works(world: World, damage: str) -> None:
    dev = world.device(f"damaged-{damage}")
    ts = world.meta / "timestamp.json"
    with served_as_is(world):
        good = ts.read_bytes()
        if damage == "truncated":
            ts.write_bytes(good[: len(good) // 2])
        elif damage == "garbage":
            ts.write_bytes(b"\x00\xff" * 100)
        elif damage == "oversized":
            ts.write_bytes(good[:-2] + b" " * 20000 + good[-2:])
        else:
            ts.unlink()
        code, says = ("unreachable", "fetching TUF metadata") if damage == "missing" else ("signature", "refused")
        refused(dev, code, says=says)
    assert dev.agent("check").returncode in (EXIT["ok"], EXIT["up-to-date"])  # served again: it recovers


def test_a_torn_local_metadata_file_falls_back_to_the_last_trusted(world: World) -> None:
    """A power cut in a refresh: the files on the data partition are half written. The timestamp is
    fetched again; a root that does not load is restored from the copy of the last trusted root. Never from
    the image's older root (issue 33, finding 16: a rollback of trust, to keys a rotation retired): with no copy
    left, the device refuses until an operator resets its trust on purpose."""
    world.release("1.0.1", "torn")
    dev = world.device("torn", channel="torn")
    assert dev.agent("check").returncode in (EXIT["ok"], EXIT["up-to-date"])
    meta = dev.root / "var/lib/kiln/tuf/metadata"
    (meta / "timestamp.json").write_bytes(b'{"signed": {"_type": "timest')
    assert dev.agent("check").returncode in (EXIT["ok"], EXIT["up-to-date"])
    copies = dev.root / "var/lib/kiln/tuf/roots"
    trusted = Metadata.from_file(str(meta / "root.json")).signed.version
    assert (copies / f"{trusted}.root.json").read_bytes() == (meta / "root.json").read_bytes()
    root = meta / "root.json"
    target = root.resolve()
    target.write_bytes(target.read_bytes()[:100])
    proc = dev.agent("check")
    assert proc.returncode in (EXIT["ok"], EXIT["up-to-date"]), proc.stderr
    assert f"restored the last trusted root, v{trusted}, from its copy" in proc.stderr, proc.stderr
    assert "image's root" not in proc.stderr
    # Every copy torn too: refused, nothing installed, and the way out named.
    root.resolve().write_bytes(b"{")
    for copy in copies.iterdir():
        copy.write_bytes(b'{"signed"')
    before = slots(dev)
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["signature"], proc.stderr
    assert "refusing to start again from the image's older root" in proc.stderr and "kiln-agent trust-reset" in \
        proc.stderr, proc.stderr
    assert slots(dev) == before
    proc = dev.agent("trust-reset")
    assert proc.returncode == 0 and "the next check starts from the image's root" in proc.stderr, proc.stderr
    assert dev.agent("check").returncode in (EXIT["ok"], EXIT["up-to-date"])  # from the image's root, up the chain
    assert dev.state()["trust"]["rootVersion"] == trusted


def test_a_released_version_never_changes_digest(world: World) -> None:
    from builder.core.errors import UsageError

    digest = world.release("1.1.0")
    other = "sha256:" + "0" * 64
    with pytest.raises(UsageError, match="a released version never changes digest"):
        world.repo.publish(Release(CLS, "stable", "1.1.0", other, 100, "kiln,tiny"))
    [kept] = [r for r in world.repo.status(CLS)["releases"] if (r["channel"], r["version"]) == ("stable", "1.1.0")]
    assert kept["digest"] == digest
