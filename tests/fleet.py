"""Helpers for the fleet tests: a real PostgreSQL server (Debian's postgresql package), the real
`kiln fleet serve` (uvicorn over TLS) as a subprocess, and simulated devices that run the agent's
own identity, outbox and upload code in this process."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_device.agent.config import Config, Fleet
from kiln_device.agent.identity import Identity, load_or_create
from kiln_device.agent.outbox import Outbox
from kiln_device.agent.report import upload
from kiln_device.contract import Release, parse_release
from tests.conftest import kiln, require_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        require_tool(f"postgresql ({tool})")  # fails under CI=true, skips otherwise
    return found[-1]


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, its own directory); yields its URL."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    directory = Path(tempfile.mkdtemp(prefix="kiln-pg-", dir="/var/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the package's postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(directory, "postgres", "postgres")
    data, port = directory / "data", free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync",
                        "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(directory / "log"), "-w", "-t", "60",
                        "-o", f"-h 127.0.0.1 -p {port} -k {directory} -c fsync=on", "start"],
                       check=True, capture_output=True, timeout=90)
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE kiln")
        yield f"postgresql://postgres@127.0.0.1:{port}/kiln"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=60, check=False)
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class FleetService:
    url: str  # the devices' listener
    ca: Path
    proc: subprocess.Popen[bytes]
    log: Path
    operator_url: str = ""  # the operators' (/v1/status, the HTML page)

    def get(self, path: str, *, operator: bool | None = None, token: str | None = None) -> Any:
        """GET PATH: from the operators' listener for their paths (OPERATOR overrides), with TOKEN as bearer."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        on_operator = path.startswith(("/v1/status", "/?")) or path == "/" if operator is None else operator
        req = urllib.request.Request((self.operator_url if on_operator else self.url) + path,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if path.startswith(("/v1", "/healthz")) else body.decode()

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def declare_only(service: FleetService, path: str, length: int) -> tuple[int, dict[str, Any]]:
    """A POST that declares LENGTH bytes and sends none: the service must refuse it from its headers
    (it answers before the body, so a client still sending would see the connection close)."""
    import http.client

    ctx = ssl.create_default_context(cafile=str(service.ca))
    host, port = service.url.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


@contextlib.contextmanager
def running_fleet(tmp: Path, db: str, *, key_dir: Path | None = None, lookaside: Path | None = None,
                  env: dict[str, str] | None = None, hosts: tuple[str, ...] = ("127.0.0.1",),
                  operator_token: Path | None = None, extra: tuple[str, ...] = ()) -> Iterator[FleetService]:
    """`kiln fleet serve` on a free loopback port, its TLS made by `kiln fleet init` for HOSTS (a QEMU guest
    reaches the host at 10.0.2.2)."""
    tls = tmp / "tls"
    if not (tls / "server.pem").exists():
        kiln("fleet", "init", str(tls), *(a for h in hosts for a in ("--host", h)), "--db", db, env=env, check=True)
    port, operator_port = free_port(), free_port()
    while operator_port == port:
        operator_port = free_port()
    args = ["fleet", "serve", "--listen", f"127.0.0.1:{port}", "--tls-dir", str(tls), "--db", db,
            "--operator-listen", f"127.0.0.1:{operator_port}"]
    if operator_token is not None:
        args += ["--operator-token-file", str(operator_token)]
    args += list(extra)
    if key_dir is not None:
        args += ["--key", str(key_dir), "--lookaside", str(lookaside), "--tick", "1"]
    log = tmp / f"fleet-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "builder.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    service = FleetService(f"https://127.0.0.1:{port}", tls / "ca.pem", proc, log, f"https://127.0.0.1:{operator_port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                service.get("/healthz")
                break
            except (OSError, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"kiln fleet serve did not start:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield service
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class SimDevice:
    """A device without a disk: the agent's real identity, outbox and upload code, its own state dir."""

    root: Path
    config: Config
    release: Release

    @classmethod
    def create(cls, root: Path, service: FleetService | None, token: Path, *, klass: str = "tiny",
               version: str = "1.0.0", outbox_max: int = 2000, batch: int = 200, url: str | None = None,
               identity: str = "file", serial: str | None = None) -> SimDevice:
        state = root / "agent"
        if token.is_file():  # each device its own copy, as each disk is flashed with one: the agent deletes it
            (root / "etc").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(token, root / "etc/enroll.token")
            token = root / "etc/enroll.token"
        fleet = Fleet(url=url if url is not None else (service.url if service else ""),
                      ca=service.ca if service else Path("/nonexistent"), token=token, outbox_max=outbox_max,
                      batch=batch, identity=identity, serial=serial)
        config = Config(registry="", repository="", channel="stable", lookaside="", insecure=True,
                        policy=Path("/nonexistent"), release=Path("/nonexistent"), state_dir=state,
                        oci_dir=root / "oci", work_dir=root / "work", esp=root / "efi", slots={}, partuuids={},
                        cmdline=root / "cmdline", efivars=root / "efivars", boot_id=root / "boot_id",
                        reboot_command=("true",), fleet=fleet)
        release = parse_release({"class": klass, "compatible": f"kiln,{klass}", "version": version})
        return cls(root, config, release)

    @property
    def identity(self) -> Identity:
        return load_or_create(self.config.identity_dir, self.config.fleet.identity)

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.config.outbox_dir, self.config.fleet.outbox_max)

    def emit(self, kind: str, **fields: Any) -> int:
        return self.outbox.append(kind, fields)

    def report(self, *, force: bool = True) -> int:
        return upload(self.config, self.release, force=force)


@dataclass
class SoftTPM:
    """A swtpm (Debian's swtpm package) on 127.0.0.1: a TPM 2.0 that tpm2-tools reach through TCTI."""

    state: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def persistent(self) -> list[str]:
        out = subprocess.run(["tpm2_getcap", "handles-persistent"], env={**os.environ, "TPM2TOOLS_TCTI": self.tcti},
                             capture_output=True, text=True, check=True, timeout=30).stdout
        return [line.strip("- ") for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def running_swtpm(state: Path) -> Iterator[SoftTPM]:
    """A software TPM keeping its state in STATE (a second start with the same STATE is the same TPM)."""
    swtpm = require_tool("swtpm")
    require_tool("tpm2_createprimary")
    state.mkdir(parents=True, exist_ok=True)
    port = free_port()
    while port >= 65535 or not port_free(port + 1):  # the swtpm TCTI finds the control port at PORT + 1
        port = free_port()
    ctrl = port + 1
    proc = subprocess.Popen([swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state.resolve()}",
                             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                             "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                             "--flags", "not-need-init,startup-clear"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swtpm did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.05)
        yield SoftTPM(state, port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
