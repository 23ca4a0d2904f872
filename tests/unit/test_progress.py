"""Progress on long steps: timestamped lines and heartbeats off a terminal, a live status line on one."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time

import pytest

from builder.core.progress import Steps

pytestmark = pytest.mark.unit
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_off_a_terminal_every_line_is_stamped_and_long_steps_say_they_are_going(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_PROGRESS_SECONDS", "1")
    steps = Steps(terminal=False)
    with steps.step("push the image"), steps.step("inner"):
        time.sleep(2.4)
    lines = capsys.readouterr().err.splitlines()
    assert all(re.match(STAMP + " ", line) for line in lines), lines
    beats = [line for line in lines if " ... push the image: " in line]
    assert len(beats) == 2, lines  # at 1 s and 2 s; the inner step has none of its own
    assert lines[0].endswith("==> push the image") and "<== push the image (2." in lines[-1]
    assert list(steps.summary()) == ["push the image"]


def test_on_a_terminal_the_running_step_is_a_live_line() -> None:
    """A real pseudo-terminal: the step's name and its seconds are drawn while it runs, then cleared."""
    code = ("import time\nfrom builder.core.progress import Steps\ns = Steps()\n"
            "with s.step('sign the image'):\n    print('tool output', flush=True)\n    time.sleep(1.6)\n")
    parent, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"TERM": "xterm-256color", "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=30) == 0
    text = out.decode(errors="replace")
    assert "sign the image (1 s)" in text, text  # the live line, redrawn with the time
    assert "tool output" in text and "<== sign the image (1." in text
    assert not re.search(STAMP, text)  # a terminal gets no timestamps
