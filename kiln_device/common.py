"""Shared by every device program: logging, the argument parser, files written atomically,
hashes, JSON, and run(), the one way the device code starts an external command."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

CHUNK = 4 * 1024 * 1024
TOOL_PATH = ":/usr/sbin:/sbin"  # appended to $PATH: mkfs.erofs lives in sbin


# Where device code run on a build host logs instead of stderr (the builder's run log, builder.core.output).
LOG_SINK: Callable[[str], None] | None = None


def make_logger(prog: str) -> Callable[[str], None]:
    """A log(message) that writes `prog: message` to stderr (the journal, under systemd), or to LOG_SINK."""

    def log(message: str) -> None:
        if LOG_SINK is not None:
            LOG_SINK(f"{prog}: {message}")
            return
        print(f"{prog}: {message}", file=sys.stderr, flush=True)

    return log


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class Parser(argparse.ArgumentParser):
    """argparse that exits with `usage_code` (64, EX_USAGE, unless told) on a usage error."""

    def __init__(self, *args: Any, usage_code: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_code = usage_code

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(self.usage_code)


# --- files ------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # vfat directories may refuse fsync; the rename is what matters
        if exc.errno not in (errno.EINVAL, errno.EROFS):
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    # One writer per process and thread: two threads writing the same file never share a temp file.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a temp file next to `path`, fsync it, rename over `path`, fsync it and the directory.

    The second fsync is for vfat (the ESP): its rename makes a new directory entry with size 0
    and the real size lands only when the inode is written back. Without it, a power cut right
    after the rename leaves an empty boot entry (found by the power-cut test in QEMU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_file(path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: object, default: Callable[[Any], Any] | None = None,
                      mode: int = 0o644) -> None:
    """`data` as indented, sorted JSON, written atomically (write_atomic)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=default) + "\n"
    write_atomic(path, text.encode(), mode)


def copy_atomic(src: Path, dest: Path) -> str:
    """Copy `src` to `dest` atomically (tmp, fsync, rename, fsync again, fsync dir: see write_atomic);
    the sha256 of the bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_file(dest)
    fsync_dir(dest.parent)
    return digest.hexdigest()


def sha256_file(path: Path, size: int | None = None) -> str:
    """sha256 of a file or the first `size` bytes of a device, read past the page cache.
    An OSError when the file ends before `size` bytes."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        remaining = size if size is not None else -1
        while remaining != 0:
            chunk = os.read(fd, CHUNK if remaining < 0 else min(CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining > 0:
                remaining -= len(chunk)
        if remaining > 0:
            raise OSError(errno.EIO, f"{path}: ended {remaining} bytes early")
    finally:
        os.close(fd)
    return digest.hexdigest()


# --- external commands --------------------------------------------------------------------


class CommandError(Exception):
    """An external command that could not run or did not succeed."""

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(message)
        self.tool = tool


class ToolMissing(CommandError):
    pass


class CommandTimeout(CommandError):
    pass


class CommandFailed(CommandError):
    def __init__(self, tool: str, returncode: int, stderr: str) -> None:
        super().__init__(tool, f"{tool} failed ({returncode}): {stderr[-1500:]}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + TOOL_PATH)


def run(argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
        env: Mapping[str, str] | None = None, log: Callable[[str], None] | None = None) -> Completed:
    """Run a command: resolve the tool first (ToolMissing), print `+ argv` through `log`, stdin
    /dev/null, capture its output. A non-zero exit raises CommandFailed when `check`; running
    past `timeout` seconds raises CommandTimeout."""
    tool = find_tool(argv[0])
    if tool is None:
        raise ToolMissing(argv[0], f"{argv[0]} is not installed")
    if log is not None:
        log("+ " + " ".join(argv))
    try:
        proc = subprocess.run([tool, *argv[1:]], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, check=False)
    except subprocess.TimeoutExpired:
        raise CommandTimeout(argv[0], f"{argv[0]} timed out after {timeout} s") from None
    done = Completed(proc.returncode, proc.stdout.decode(errors="replace"),
                     proc.stderr.decode(errors="replace").strip())
    if check and done.returncode != 0:
        raise CommandFailed(argv[0], done.returncode, done.stderr)
    return done
