"""`kiln channel`: the TUF repository from the command line, and its refusals (located, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import kiln, require_tool

pytestmark = pytest.mark.integration


def test_channel_lifecycle_from_the_command_line(tmp_path: Path) -> None:
    require_tool("gpg")
    keys, new, la = tmp_path / "keys", tmp_path / "new", tmp_path / "lookaside"
    assert kiln("keys", "init", str(keys), "--no-passphrase", state=tmp_path / "state").returncode == 0
    assert sorted(p.name for p in (keys / "tuf").iterdir()) == ["online.pem", "rollout.pem", "root.json", "root.pem",
                                                                "targets.pem"]
    assert all((keys / "tuf" / p).stat().st_mode & 0o077 == 0 for p in ("root.pem", "targets.pem", "online.pem"))
    r = kiln("channel", "status", "--lookaside", str(la), state=tmp_path / "state")
    assert r.returncode == 2 and "run `kiln channel init` first" in r.stderr and "Traceback" not in r.stderr
    assert kiln("channel", "init", "--key", str(keys), "--lookaside", str(la), state=tmp_path / "state").returncode == 0
    assert (la / "tuf/metadata/1.root.json").read_bytes() == (keys / "tuf/root.json").read_bytes()
    again = kiln("channel", "init", "--key", str(keys), "--lookaside", str(la), state=tmp_path / "state")
    assert again.returncode == 2 and "already holds a TUF repository" in again.stderr
    r = kiln("channel", "withdraw", "qemu-x86_64", "1.0.0", "--reason", "x", "--key", str(keys),
             "--lookaside", str(la), state=tmp_path / "state")
    assert r.returncode == 2 and "was never released on stable" in r.stderr
    assert kiln("channel", "refresh", "--key", str(keys), "--lookaside", str(la),
                state=tmp_path / "state").returncode == 0
    assert kiln("keys", "init", str(new), "--no-passphrase", state=tmp_path / "state").returncode == 0
    r = kiln("channel", "rotate", "targets", "--new-key", str(new), "--key", str(keys), "--lookaside", str(la),
             state=tmp_path / "state")
    assert r.returncode == 0, r.stderr
    assert (keys / "tuf/targets.pem").read_bytes() == (new / "tuf/targets.pem").read_bytes()
    assert json.loads((keys / "tuf/root.json").read_text())["signed"]["version"] == 2  # what new images bake
    st = json.loads(kiln("channel", "status", "--json", "--lookaside", str(la), state=tmp_path / "state").stdout)
    assert st["roles"]["root"]["version"] == 2 and st["roles"]["timestamp"]["version"] == 3
    (keys / "tuf/online.pem").write_text("not a key")
    r = kiln("channel", "refresh", "--key", str(keys), "--lookaside", str(la), state=tmp_path / "state")
    assert r.returncode == 2 and "online.pem: the PEM private key does not load" in r.stderr
