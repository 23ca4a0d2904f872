"""Where a run's details go: the external commands Kiln runs (`+ podman build ...`), their output,
and the lines of device code run on the host (`kiln-agent: + fsverity ...`).

The `kiln` command shows steps, progress and results (builder.core.progress) and writes the details to a
log file, `<state>/logs/kiln-<UTC time>-<pid>.log` (mode 0600, secrets masked as on the terminal),
whose path it prints once, when the first detail is written, and again after an error. `kiln
--debug` shows the details on stderr as well. The log keeps the step lines too, so it reads on its
own; the newest KEEP logs are kept.

Library callers that never call `configure` (tests, bench/) get the details on stderr, as before,
unless KILN_QUIET=1.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

KEEP = 20


class _Output:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        if getattr(self, "file", None) is not None:
            self.file.close()  # type: ignore[union-attr]
        self.show = os.environ.get("KILN_QUIET") != "1"
        self.configured = False
        self.log_dir: Callable[[], Path] | None = None
        self.path: Path | None = None
        self.file: IO[str] | None = None
        self.failed = False


_out = _Output()


def configure(*, show: bool, log_dir: Callable[[], Path]) -> None:
    """The CLI's choice: details on stderr only with `show` (--debug), always in a log file under log_dir()."""
    from kiln_device import common

    _out.reset()
    _out.show, _out.configured, _out.log_dir = show, True, log_dir
    common.LOG_SINK = detail  # device code run by the builder (the agent's layer store) logs here


def reset() -> None:
    """Back to the library default (the CLI calls it when its command ends)."""
    from kiln_device import common

    _out.reset()
    common.LOG_SINK = None


def configured() -> bool:
    """Whether a CLI run chose where details go (external commands' output is then read, not inherited)."""
    return _out.configured


def log_path() -> Path | None:
    """This run's log file, once something was written to it."""
    return _out.path


def detail(line: str) -> None:
    """A command line, a line of its output, or a device-side log line: the log, and stderr if shown."""
    if _out.configured:
        _write_log(line)
    if _out.show:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def note(line: str) -> None:
    """A line already shown on the terminal (a step, a result): into the log for context, once one is open."""
    if _out.file is not None:
        _write_log(line)


def _write_log(line: str) -> None:
    if _out.file is None and not _out.failed:
        _open()
    if _out.file is not None:
        _out.file.write(line + "\n")
        _out.file.flush()


def _open() -> None:
    assert _out.log_dir is not None
    try:
        folder = _out.log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"kiln-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _out.file = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
        _out.path = path
        _prune(folder, keep=path)
    except OSError as exc:  # no log is no reason to stop a build: say so once, and show details instead
        _out.failed, _out.show = True, True
        sys.stderr.write(f"kiln: cannot write a log file ({exc}); showing commands here instead\n")
        return
    sys.stderr.write(f"kiln: commands and their output go to {_shown(path)}\n")
    sys.stderr.flush()


def _prune(folder: Path, keep: Path) -> None:
    logs = sorted(folder.glob("kiln-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-KEEP]:
        if old != keep:
            old.unlink(missing_ok=True)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def shown_log_path() -> str | None:
    return _shown(_out.path) if _out.path is not None else None


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def inert(text: str) -> str:
    """Text from outside (what devices report) safe to print on a terminal: control characters, escape
    sequences among them, shown as \\xNN instead of reaching the terminal."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)
