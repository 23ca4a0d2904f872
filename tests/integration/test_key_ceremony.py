"""The key ceremony (issue 33, finding 1): the TUF root kept offline with a threshold of keys, exports that
never carry a root key, and a leaked online key rotated with one command that devices follow.

Before: `kiln keys export` put the root key into the one CI secret with every other key, so whoever held
that secret, or the fleet host, could rotate every role and sign anything. The device here is the real
agent (tests/ota.py's FakeDevice) reading real python-tuf metadata over HTTP."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Timestamp

from builder.keys.signer import load_signer
from builder.keys.tuf_keys import TrustKeys, trust_root
from builder.release.trust import Repository
from tests.conftest import kiln, require_tool
from tests.integration.test_trusted_channel import EXIT, World, refused
from tests.ota import ota_services

pytestmark = pytest.mark.integration
PASSPHRASE = "correct horse battery staple"
ENV = {"KILN_KEY_PASSPHRASE": PASSPHRASE}


def exported(key_dir: Path, state: Path, *extra: str) -> tuple[set[str], str]:
    r = kiln("keys", "export", str(key_dir), *extra, state=state, env=ENV)
    assert r.returncode == 0, r.stderr
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(r.stdout.strip())), mode="r:gz") as tar:
        return set(tar.getnames()), r.stderr


@pytest.fixture(scope="module")
def ceremony(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Path], Path]]:
    """Root keys 2 of 3, each with its own holder; the key directory CI and the fleet draw from."""
    require_tool("gpg")
    tmp = tmp_path_factory.mktemp("ceremony")
    state = tmp / "state"
    r = kiln("keys", "root", "init", str(tmp / "root"), "--keys", "3", "--threshold", "2", state=state)
    assert r.returncode == 2 and "need a passphrase" in r.stderr and "Traceback" not in r.stderr  # never without one
    r = kiln("keys", "root", "init", str(tmp / "root"), "--keys", "3", "--threshold", "2", state=state, env=ENV)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp / "root").iterdir()) == ["root-1.pem", "root-2.pem", "root-3.pem",
                                                                "root-policy.json"]
    holders = []
    for n in (1, 2, 3):  # each key on its own medium, with the policy
        holder = tmp / f"holder-{n}"
        holder.mkdir(mode=0o700)
        shutil.move(tmp / "root" / f"root-{n}.pem", holder / f"root-{n}.pem")
        shutil.copy(tmp / "root" / "root-policy.json", holder)
        holders.append(holder)
    keys = tmp / "release-key"
    r = kiln("keys", "init", str(keys), "--root", str(holders[0]), state=state, env=ENV)
    assert r.returncode == 2 and "needs 2 of the 3 root keys' signatures; 1 given" in r.stderr, r.stderr
    shutil.rmtree(keys, ignore_errors=True)
    r = kiln("keys", "init", str(keys), "--root", str(holders[0]), "--root", str(holders[1]), state=state, env=ENV)
    assert r.returncode == 0, r.stderr
    yield tmp, holders, keys


def test_root_v1_names_three_root_keys_and_needs_two(ceremony: tuple[Path, list[Path], Path]) -> None:
    _, _, keys = ceremony
    assert sorted(p.name for p in (keys / "tuf").iterdir()) == ["online.pem", "rollout.pem", "root.json",
                                                                "targets.pem"]  # no root key in it
    root: Metadata[Root] = Metadata.from_bytes((keys / "tuf/root.json").read_bytes())
    assert (len(root.signed.roles["root"].keyids), root.signed.roles["root"].threshold) == (3, 2)
    assert len(root.signatures) == 2
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)


def test_exports_never_carry_a_root_key(ceremony: tuple[Path, list[Path], Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, _, keys = ceremony
    names, _ = exported(keys, tmp / "state")
    assert {"tuf/targets.pem", "tuf/online.pem", "tuf/rollout.pem", "tuf/root.json", "key.json"} <= names
    assert any(n.startswith("gnupg/") for n in names) and not any("root-" in n or n.endswith("root.pem")
                                                                  for n in names)
    # Secure Boot (issue 32): CI gets db, which signs each build's UKIs; PK and KEK own the firmware and stay
    # offline like the root. Every private key in the export is encrypted with the key's passphrase.
    assert {"secureboot/db.key", "secureboot/db.crt", "secureboot/PK.crt", "secureboot/KEK.crt"} <= names
    assert not {"secureboot/PK.key", "secureboot/KEK.key"} & names
    assert b"ENCRYPTED" in (keys / "secureboot/db.key").read_bytes()
    fleet, _ = exported(keys, tmp / "state", "--for", "fleet")
    assert fleet == {"key.json", "release-key.asc", "tuf/root.json", "tuf/online.pem", "tuf/rollout.pem"}
    # A development key directory with a root key of its own: the export leaves it out, and says so.
    dev = tmp_path / "dev-key"
    assert kiln("keys", "init", str(dev), "--no-passphrase", state=tmp / "state").returncode == 0
    assert (dev / "tuf/root.pem").is_file()
    names, said = exported(dev, tmp / "state")
    assert "tuf/root.pem" not in names and "tuf/targets.pem" in names
    assert "root.pem: a root key stays offline" in said, said
    # The fleet service's host imports only what it signs with: `kiln fleet serve --key` loads it.
    data = kiln("keys", "export", str(keys), "--for", "fleet", state=tmp / "state", env=ENV).stdout.strip()
    r = kiln("keys", "import", str(tmp_path / "fleet-key"), state=tmp / "state",
             env={**ENV, "KILN_RELEASE_KEY": data})
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("KILN_KEY_PASSPHRASE", PASSPHRASE)
    assert set(TrustKeys.load(tmp_path / "fleet-key", only=("rollout", "online")).signers) == {"rollout", "online"}
    assert not (tmp_path / "fleet-key/tuf/targets.pem").exists() and not (tmp_path / "fleet-key/gnupg").exists()


def test_a_leaked_online_key_is_rotated_with_one_command_and_devices_follow(
        ceremony: tuple[Path, list[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, holders, keys = ceremony
    monkeypatch.setenv("KILN_KEY_PASSPHRASE", PASSPHRASE)  # this process signs releases with the keys
    with ota_services(tmp_path) as s:
        Repository(s.lookaside / "tuf", TrustKeys.load(keys)).init(trust_root(keys) or b"")
        world = World(s.registry, s.registry_log, s.lookaside, s.lookaside_url, s.key, keys, s.state,
                      tmp_path / "oci", tmp_path)
        world.release("1.1.0")
        first = world.device("first")  # flashed with root v1, like every device
        assert first.agent("update", "--no-reboot").returncode == EXIT["ok"]
        leaked = load_signer(keys / "tuf/online.pem")
        la = ("--key", str(keys), "--lookaside", str(s.lookaside))
        # Two holders of three bring their keys: one command makes the new key, root v2 and snapshot and timestamp.
        r = kiln("channel", "rotate", "online", *la, "--root", str(holders[1]), "--root", str(holders[2]),
                 state=tmp / "state", env=ENV)
        assert r.returncode == 0, r.stderr
        assert load_signer(keys / "tuf/online.pem").public_key.keyid != leaked.public_key.keyid
        assert json.loads((keys / "tuf/root.json").read_text())["signed"]["version"] == 2  # what new images bake
        assert not list((keys / "tuf").glob(".online.*"))  # nothing staged is left
        world.release("1.2.0")
        second = world.device("second")
        proc = second.agent("update", "--no-reboot")
        assert proc.returncode == EXIT["ok"], proc.stderr
        assert second.state()["trust"]["rootVersion"] == 2
        # A timestamp the leaked key signs (a server in between, replaying or freezing): refused.
        ts_file = world.meta / "timestamp.json"
        good = ts_file.read_bytes()
        ts: Metadata[Timestamp] = Metadata.from_bytes(good)
        ts.signed.version += 1
        ts.sign(leaked, append=False)
        ts_file.write_bytes(ts.to_bytes())
        try:
            refused(world.device("third"), "signature", says="timestamp")
        finally:
            ts_file.write_bytes(good)
        # One root key alone rotates nothing: refused before anything is written.
        r = kiln("channel", "rotate", "targets", *la, "--root", str(holders[0]), state=tmp / "state", env=ENV)
        assert r.returncode == 2 and "needs 2 of the 3 root keys' signatures; 1 given" in r.stderr, r.stderr
        assert not (world.meta / "3.root.json").exists()
        # And a root v3 that one root key signed, put on the server by whoever holds it: devices refuse it.
        forged: Metadata[Root] = Metadata.from_bytes((world.meta / "2.root.json").read_bytes())
        forged.signed.version = 3
        forged.signed.roles["targets"].keyids = [leaked.public_key.keyid]
        forged.signed.keys[leaked.public_key.keyid] = leaked.public_key
        forged.sign(load_signer(holders[0] / "root-1.pem"), append=False)
        (world.meta / "3.root.json").write_bytes(forged.to_bytes())
        try:
            proc = second.agent("update", "--no-reboot")
            assert proc.returncode == EXIT["signature"] and "root" in proc.stderr, proc.stderr
            assert second.state()["trust"]["rootVersion"] == 2
        finally:
            (world.meta / "3.root.json").unlink()
