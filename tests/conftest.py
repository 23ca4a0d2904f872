"""Shared test plumbing: tool requirements that skip locally but fail in CI."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
VENV_BIN = str(Path(sys.executable).parent)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true",
                     help="Rewrite golden files (rendered Containerfiles) instead of comparing.")


def tool_path(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + VENV_BIN + ":/usr/sbin:/sbin")


def require_tool(name: str) -> str:
    """The tool's path; skip when it is missing locally, fail when CI=true."""
    path = tool_path(name)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: a missing tool is a failure, not a skip)")
        pytest.skip(message)
    return path


def kiln(*args: str, cwd: Path = ROOT, state: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
    """`kiln ARGS` in a process of its own, as a user runs it, from CWD (default the checkout): the
    checkout on PYTHONPATH, KILN_STATE_DIR=STATE when given, ENV on top. With `check`, a non-zero exit
    fails the test with both outputs."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **({"KILN_STATE_DIR": str(state)} if state else {}), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_log(stderr: str, cwd: Path = ROOT) -> str:
    """The detail log of one `kiln` run: the commands it ran and their output, which go to a file under the state
    directory, named on stderr ("kiln: commands and their output go to PATH")."""
    found = re.search(r"^kiln: commands and their output go to (\S+)$", stderr, re.M)
    assert found, f"the run named no log:\n{stderr[-3000:]}"
    return (cwd / found.group(1)).read_text()


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden"))


TIERS = ("unit", "integration", "container", "vm", "vmlong", "accel", "arm64long")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets its directory's tier marker (tests/unit -> unit, ...)."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in TIERS and not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(getattr(pytest.mark, parts[0]))


def _gpg_agents() -> dict[int, str]:
    """pid -> homedir of the gpg-agent daemons running now."""
    agents = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"gpg-agent") and b"--homedir" in argv:
            agents[int(proc.name)] = argv[argv.index(b"--homedir") + 1].decode(errors="replace")
    return agents


@pytest.fixture(scope="session", autouse=True)
def stop_gpg_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """gpg starts an agent per key directory and leaves it running: stop the ones this session started, for
    key directories of its own (its temporary directories, this checkout). Another test session running beside
    this one (another checkout, CI) keeps its agents: stopping them failed its key generation mid-way."""
    before = set(_gpg_agents())
    ours = (tmp_path_factory.getbasetemp().resolve(), ROOT)
    yield
    gpgconf = shutil.which("gpgconf")
    for pid, home in _gpg_agents().items():
        if pid in before or not any(Path(home).resolve().is_relative_to(d) for d in ours):
            continue
        if gpgconf and Path(home).is_dir():
            subprocess.run([gpgconf, "--kill", "gpg-agent"], env={**os.environ, "GNUPGHOME": home},
                           capture_output=True, check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


DISK_FILES = (".raw", ".qcow2")  # a raw disk is 7 GiB sparse, 1-3 GiB allocated after a boot or an update
BIG_FILES = ("rootfs.tar",)


def remove_disk_images(base: Path) -> list[Path]:
    """Delete the disk images and rootfs tarballs under BASE (symlinks are not followed); what was removed."""
    removed = []
    for dirpath, _dirs, files in os.walk(base, followlinks=False):
        for name in files:
            path = Path(dirpath) / name
            if (name.endswith(DISK_FILES) or name in BIG_FILES) and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@pytest.fixture(scope="session", autouse=True)
def disk_images_go_at_the_end(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A run's disk copies are removed when it ends (logs and consoles stay for a look): pytest keeps
    the temp dirs of three runs, which were three times 18 GB of disk copies after the vm tier."""
    yield
    remove_disk_images(tmp_path_factory.getbasetemp())
