"""A local OCI registry: Debian's `docker-registry` (distribution 2.8) on 127.0.0.1.

    kiln registry start [--port 5000]   # config, data and log under .kiln/registry/
    kiln registry status
    kiln registry stop

Tests use `running_registry(root)`, a context manager that starts one on a
free port and always stops it. The registry is started with
`REGISTRY_AUTH_FILE` removed from its environment: podman uses that variable
for its credentials file, and distribution would read it as configuration.

Optional htpasswd auth (`--htpasswd USER`, the password from $KILN_REGISTRY_PASSWORD or stdin; bcrypt via the `bcrypt`
package) and TLS (`--tls`: a self-signed certificate for 127.0.0.1 made with
`openssl`, written next to the config; clients then need `--cert-dir`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

from builder.core.errors import KilnError, RegistryError, ToolMissing, UsageError
from builder.core.files import write_json_atomic
from builder.core.net import free_port
from builder.core.run import find_tool, run, spawn

DEFAULT_PORT = 5000
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class RegistryPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "registry.json"

    @property
    def htpasswd(self) -> Path:
        return self.root / "htpasswd"

    @property
    def cert(self) -> Path:
        return self.root / "tls" / "cert.pem"

    @property
    def key(self) -> Path:
        return self.root / "tls" / "key.pem"


@dataclass(frozen=True)
class RegistryInfo:
    address: str  # host:port, what `kiln push` takes
    pid: int
    tls: bool
    auth: bool
    root: Path
    lookaside: str | None = None  # http://127.0.0.1:PORT serving the signature directory
    lookaside_pid: int | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"


def render_config(paths: RegistryPaths, address: str, *, tls: bool, auth: bool) -> str:
    lines = [
        "# Written by Kiln (kiln registry start). Edits are overwritten.",
        "version: 0.1",
        "log: {level: info, formatter: text}",
        f"storage: {{filesystem: {{rootdirectory: {json.dumps(str(paths.data))}}}, delete: {{enabled: true}}}}",
        "http:",
        f"  addr: {address}",
    ]
    if tls:
        lines += ["  tls:", f"    certificate: {json.dumps(str(paths.cert))}", f"    key: {json.dumps(str(paths.key))}"]
    if auth:
        lines += ["auth:", "  htpasswd:", "    realm: kiln", f"    path: {json.dumps(str(paths.htpasswd))}"]
    return "\n".join(lines) + "\n"


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def make_htpasswd(path: Path, credentials: str) -> None:
    user, sep, password = credentials.partition(":")
    if not sep or not user or not password:
        raise UsageError("htpasswd: expected a user and a password")
    try:
        import bcrypt
    except ImportError as exc:
        raise ToolMissing("htpasswd auth needs the bcrypt package; install it with: pip install bcrypt") from exc
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
    path.write_text(f"{user}:{hashed}\n")
    path.chmod(0o600)


def make_certificate(paths: RegistryPaths) -> None:
    paths.cert.parent.mkdir(parents=True, exist_ok=True)
    if paths.cert.exists() and paths.key.exists():
        return
    find_tool("openssl")
    run([
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "365", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", paths.key, "-out", paths.cert,
    ], capture=True)  # fmt: skip
    paths.key.chmod(0o600)


def read_info(paths: RegistryPaths) -> RegistryInfo | None:
    """The registry recorded in the pid file, if its process is still alive."""
    try:
        data = json.loads(paths.pidfile.read_text())
        info = RegistryInfo(address=data["address"], pid=int(data["pid"]), tls=bool(data["tls"]),
                            auth=bool(data["auth"]), root=paths.root, lookaside=data.get("lookaside"),
                            lookaside_pid=data.get("lookasidePid"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return info


def start_registry(root: Path, *, port: int | None = None, tls: bool = False,
                   htpasswd: str | None = None, lookaside_dir: Path | None = None,
                   lookaside_port: int | None = None) -> RegistryInfo:
    """Start a registry in the background (it outlives this process); see `stop_registry`.

    With `lookaside_dir`, a static HTTP server on 127.0.0.1:`lookaside_port` serves
    that directory: the signatures `kiln release` writes, where devices read them.
    """
    find_tool("docker-registry")
    paths = RegistryPaths(root)
    running = read_info(paths)
    if running is not None:
        raise RegistryError(f"a Kiln registry already runs at {running.address} (pid {running.pid}); "
                            "`kiln registry stop` first")
    port = port if port is not None else DEFAULT_PORT
    if port_in_use(port):
        raise RegistryError(f"127.0.0.1:{port} is already in use; pick another with --port")
    address = f"127.0.0.1:{port}"
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.data.mkdir(exist_ok=True)
    if htpasswd:
        make_htpasswd(paths.htpasswd, htpasswd)
    if tls:
        make_certificate(paths)
    paths.config.write_text(render_config(paths, address, tls=tls, auth=bool(htpasswd)))
    proc = spawn(["docker-registry", "serve", paths.config], unset_env=["REGISTRY_AUTH_FILE"],
                 log=paths.log, detach=True)
    info = RegistryInfo(address=address, pid=proc.pid, tls=tls, auth=bool(htpasswd), root=paths.root)
    try:
        wait_ready(info, proc.poll)
        if lookaside_dir is not None:
            info = start_lookaside(info, lookaside_dir, lookaside_port or free_port())
    except KilnError:
        _terminate(proc.pid)
        raise
    write_json_atomic(paths.pidfile, {"address": address, "pid": proc.pid, "tls": tls, "auth": bool(htpasswd),
                                      "lookaside": info.lookaside, "lookasidePid": info.lookaside_pid})
    return info


def start_lookaside(info: RegistryInfo, directory: Path, port: int) -> RegistryInfo:
    """The registry's signature server (start_signature_server), logging next to the registry."""
    url, pid = start_signature_server(directory, port, log=info.root / "lookaside.log")
    return replace(info, lookaside=url, lookaside_pid=pid)


def start_signature_server(directory: Path, port: int, *, log: Path | None = None) -> tuple[str, int]:
    """python3 -m http.server over a signature (lookaside) directory, on 127.0.0.1 only, in a session of
    its own (it outlives this process until stopped); its URL and pid. Kiln's one signature server:
    `kiln registry start`, running_registry and serving_lookaside all start it."""
    if port_in_use(port):
        raise RegistryError(f"127.0.0.1:{port} (the signature server) is already in use; pick another port")
    directory.mkdir(parents=True, exist_ok=True)
    proc = spawn([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", directory, str(port)],
                 log=log, detach=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).close()  # noqa: S310 - http only
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _terminate(proc.pid)
                raise RegistryError(f"the signature server on {url} did not start"
                                    + (f"; see {log}" if log else "")) from None
            time.sleep(0.1)
    return url, proc.pid


@contextmanager
def serving_lookaside(directory: Path, *, port: int | None = None) -> Iterator[str]:
    """The signature server over `directory` for a `with` block, without a registry; yields its URL.
    (Tests use it; in production any static web server will do.)"""
    url, pid = start_signature_server(directory, port if port is not None else free_port())
    try:
        yield url
    finally:
        _terminate(pid)


def stop_registry(root: Path) -> RegistryInfo | None:
    """Stop the registry recorded under `root`; None when none was running."""
    paths = RegistryPaths(root)
    info = read_info(paths)
    paths.pidfile.unlink(missing_ok=True)
    if info is not None:
        _terminate(info.pid)
        if info.lookaside_pid:
            _terminate(info.lookaside_pid)
    return info


@contextmanager
def running_registry(root: Path, *, port: int | None = None, tls: bool = False,
                     htpasswd: str | None = None, lookaside_dir: Path | None = None) -> Iterator[RegistryInfo]:
    """A registry (and, with `lookaside_dir`, its signature server) for a `with` block (tests, benchmarks)."""
    info = start_registry(root, port=port if port is not None else free_port(), tls=tls, htpasswd=htpasswd,
                          lookaside_dir=lookaside_dir)
    try:
        yield info
    finally:
        stop_registry(root)


def wait_ready(info: RegistryInfo, poll: object = None, timeout: float = START_TIMEOUT) -> None:
    """Poll GET /v2/ until the registry answers (401 counts: auth is on)."""
    import ssl

    context = ssl._create_unverified_context() if info.tls else None  # noqa: S323 - our own self-signed cert
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{info.url}/v2/", timeout=1, context=context).close()  # noqa: S310 - http(s) only
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
        except OSError:
            pass
        exited = poll() if callable(poll) else None
        if exited is not None or time.monotonic() > deadline:
            tail = info.root.joinpath("registry.log").read_text(errors="replace")[-1500:] \
                if info.root.joinpath("registry.log").exists() else ""
            why = f"exited with {exited}" if exited is not None else f"did not answer within {timeout:.0f} s"
            raise RegistryError(f"docker-registry at {info.address} {why}; log tail:\n{tail}")
        time.sleep(0.1)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:  # not our child (started by an earlier `kiln registry start`)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
