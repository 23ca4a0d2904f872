"""`kiln` shows steps and results; the commands it runs and their output go to the run's log file
(builder.core.output), and to stderr too only with --debug. Real gpg through `kiln keys init`."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from tests.conftest import kiln, require_tool

PASSPHRASE = "correct horse battery staple 7f3a"
ENV = {"KILN_KEY_PASSPHRASE": PASSPHRASE, "KILN_QUIET": "0"}  # KILN_QUIET is the library's, not the CLI's


def test_commands_go_to_the_log_not_the_terminal_unless_debug(tmp_path: Path) -> None:
    require_tool("gpg")
    state = tmp_path / "state"
    quiet = kiln("keys", "init", str(tmp_path / "k1"), state=state, cwd=tmp_path, env=ENV)
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("+ ")], quiet.stderr
    assert "fingerprint " in quiet.stdout
    where = re.search(r"^kiln: commands and their output go to (\S+)$", quiet.stderr, re.M)
    assert where, quiet.stderr
    log = tmp_path / where.group(1)
    assert log.parent == state / "logs"
    text = log.read_text()
    assert re.search(r"^\+ GNUPGHOME=\S+/k1/gnupg gpg --batch .*--quick-gen-key", text, re.M), text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert PASSPHRASE not in text and PASSPHRASE not in quiet.stderr  # given on a pipe, never logged

    loud = kiln("--debug", "keys", "init", str(tmp_path / "k2"), state=state, cwd=tmp_path, env=ENV)
    assert loud.returncode == 0, loud.stderr
    assert re.search(r"^\+ GNUPGHOME=\S+/k2/gnupg gpg --batch", loud.stderr, re.M), loud.stderr
    assert PASSPHRASE not in loud.stderr
    logs = sorted((state / "logs").glob("kiln-*.log"))
    assert len(logs) == 2 and "/k2/gnupg gpg" in logs[-1].read_text()  # one log per run, both kept
