"""Secrets: registry credentials and the release key's passphrase, kept off command lines and logs.

Registry credentials, the first that is given:

    --authfile FILE            a containers-auth.json (what `podman login` writes), used as it is
    --username USER --password-stdin   the password is the first line of stdin
    $KILN_REGISTRY_CREDS       USER:PASSWORD, in the environment (which other users cannot read)

Kiln hands podman and skopeo an auth file (`--authfile`, mode 0600, in .kiln/tmp, removed when
the command ends), never `--creds USER:PASSWORD`: a command line is readable by every user of
the machine in /proc/PID/cmdline and is echoed in logs.

The release key's passphrase (`kiln keys init` sets it on a new key): $KILN_KEY_PASSPHRASE_FILE
(a file whose first line it is), else $KILN_KEY_PASSPHRASE, else none: gpg then asks gpg-agent,
which may hold it (gpg-preset-passphrase) or ask through its pinentry.

Every secret Kiln reads is registered here, and `redact` replaces it with *** in what Kiln
prints: echoed commands, the stderr of a failed command, error messages.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import UsageError
from builder.core.redact import MASK, register

CREDS_ENV = "KILN_REGISTRY_CREDS"
PASSPHRASE_ENV = "KILN_KEY_PASSPHRASE"  # noqa: S105 (a variable name)
PASSPHRASE_FILE_ENV = "KILN_KEY_PASSPHRASE_FILE"  # noqa: S105 (a variable name)
REGISTRY_PASSWORD_ENV = "KILN_REGISTRY_PASSWORD"  # noqa: S105 (a variable name)
@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = ""

    def __repr__(self) -> str:
        return f"Credentials({self.user!r}, {MASK})"


def parse_creds(value: str, where: str) -> Credentials:
    user, sep, password = value.strip("\n").partition(":")
    if not sep or not user or not password:
        raise UsageError(f"{where}: expected USER:PASSWORD")
    register(password)
    register(value)
    return Credentials(user, password)


def registry_credentials(*, authfile: Path | None = None, username: str | None = None,
                         password_stdin: bool = False) -> Path | Credentials | None:
    """What the user gave, in the order the module doc says: an auth file, credentials, or nothing."""
    if authfile is not None:
        if username or password_stdin:
            raise UsageError("--authfile and --username/--password-stdin go separately: pick one")
        if not authfile.is_file():
            raise UsageError(f"--authfile {authfile}: no such file")
        return authfile
    if password_stdin or username:
        if not (password_stdin and username):
            raise UsageError("--password-stdin needs --username (and --username needs the password on stdin)")
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("--password-stdin: stdin held no password")
        register(password)
        return Credentials(username, password)
    raw = os.environ.get(CREDS_ENV)
    if raw:
        return parse_creds(raw, f"${CREDS_ENV}")
    return None


def sweep(tmp_dir: Path) -> None:
    """Remove the secret files a killed Kiln left in TMP_DIR (named auth-PID-* / passphrase-PID-*: PID is gone)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for path in [*tmp_dir.glob("auth-*"), *tmp_dir.glob("passphrase-*")]:
        pid = path.name.split("-")[1]
        if not pid.isdigit():
            path.unlink(missing_ok=True)  # from before the PID was in the name
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def registry_host(ref: str) -> str:
    """The registry part of REF (host[:port]/repo[:tag|@digest], or a docker:// reference)."""
    return ref.removeprefix("docker://").split("/", 1)[0]


@contextlib.contextmanager
def auth_file(registry: str, creds: Path | Credentials | None, tmp_dir: Path) -> Iterator[Path | None]:
    """An auth file for REGISTRY: the user's own, or one made from credentials (0600, removed afterwards)."""
    if creds is None or isinstance(creds, Path):
        yield creds
        return
    sweep(tmp_dir)
    fd, name = tempfile.mkstemp(prefix=f"auth-{os.getpid()}-", suffix=".json", dir=tmp_dir)  # 0600
    path = Path(name)
    token = base64.b64encode(f"{creds.user}:{creds.password}".encode()).decode()
    register(token)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"auths": {registry_host(registry): {"auth": token}}}, fh)
        yield path
    finally:
        path.unlink(missing_ok=True)


def credentials_from_auth_file(path: Path, registry: str) -> Credentials | None:
    """The USER:PASSWORD an auth file holds for REGISTRY (the Docker engine takes them in its API call)."""
    try:
        auths = json.loads(path.read_text()).get("auths") or {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a containers-auth.json file ({exc})") from None
    entry = auths.get(registry_host(registry))
    if not entry or not entry.get("auth"):
        return None
    try:
        pair = base64.b64decode(entry["auth"], validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{path}: the auth entry for {registry_host(registry)} is not base64 of "
                         "USER:PASSWORD") from None
    return parse_creds(pair, str(path))


# --- the release key's passphrase ---------------------------------------------------------------


def key_passphrase() -> str | None:
    """The release key's passphrase from the environment (module doc); None: gpg-agent's business."""
    file = os.environ.get(PASSPHRASE_FILE_ENV)
    if file:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"${PASSPHRASE_FILE_ENV}: {file}: {exc.strerror}") from None
        value = lines[0] if lines else ""
        if not value:
            raise UsageError(f"${PASSPHRASE_FILE_ENV}: {file} is empty")
        register(value)
        return value
    phrase = os.environ.get(PASSPHRASE_ENV) or None
    register(phrase)
    return phrase


@contextlib.contextmanager
def passphrase_file(tmp_dir: Path) -> Iterator[Path | None]:
    """The passphrase in a file for a tool that reads one (skopeo --passphrase-file): a 0600 file holding it
    alone (its first line, without a CR a Windows editor left), removed afterwards; None without one."""
    phrase = key_passphrase()  # normalized: the first line, whatever its line ending
    if phrase is None:
        yield None
        return
    sweep(tmp_dir)
    fd, name = tempfile.mkstemp(prefix=f"passphrase-{os.getpid()}-", dir=tmp_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(phrase + "\n")
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
