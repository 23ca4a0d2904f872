"""`kiln registry start|status|stop`: Debian's docker-registry on 127.0.0.1, with TLS and htpasswd."""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.core.net import free_port
from tests.conftest import require_tool


def get(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    context = ssl._create_unverified_context()  # the registry's self-signed certificate
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.container
def test_registry_lifecycle_with_tls_and_auth(tmp_path: Path) -> None:
    require_tool("docker-registry")
    require_tool("openssl")
    env = {"KILN_STATE_DIR": str(tmp_path / "state")}
    runner = CliRunner()
    port, sig_port = free_port(), free_port()
    sigs = tmp_path / "state/signatures/kiln"
    sigs.mkdir(parents=True)
    (sigs / "probe").write_text("signature bytes")
    r = runner.invoke(main, ["registry", "start", "--port", str(port), "--tls", "--htpasswd", "kiln",
                             "--lookaside-port", str(sig_port)], env={**env, "KILN_REGISTRY_PASSWORD": "s3cret"})
    try:
        assert r.exit_code == 0, r.output
        assert f"127.0.0.1:{port}" in r.output
        assert get(f"https://127.0.0.1:{port}/v2/") == 401
        assert get(f"https://127.0.0.1:{port}/v2/", "kiln:s3cret") == 200
        assert get(f"https://127.0.0.1:{port}/v2/", "kiln:wrong") == 401
        # the signature directory, served to devices over plain HTTP
        with urllib.request.urlopen(f"http://127.0.0.1:{sig_port}/kiln/probe", timeout=5) as response:
            assert response.read() == b"signature bytes"
        status = runner.invoke(main, ["registry", "status"], env=env)
        assert status.exit_code == 0 and f"https://127.0.0.1:{port}" in status.output
        again = runner.invoke(main, ["registry", "start", "--port", str(port)], env=env)
        assert again.exit_code == 8 and "already runs" in again.output
        config = (tmp_path / "state/registry/config.yml").read_text()
        assert f"addr: 127.0.0.1:{port}" in config and "htpasswd" in config
    finally:
        stop = runner.invoke(main, ["registry", "stop"], env=env)
    assert stop.exit_code == 0 and "stopped" in stop.output
    assert runner.invoke(main, ["registry", "status"], env=env).exit_code == 1
    for url in (f"https://127.0.0.1:{port}/v2/", f"http://127.0.0.1:{sig_port}/"):
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)


@pytest.mark.container
def test_registry_port_in_use_and_bad_htpasswd(tmp_path: Path) -> None:
    require_tool("docker-registry")
    import socket

    env = {"KILN_STATE_DIR": str(tmp_path / "state")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = CliRunner().invoke(main, ["registry", "start", "--port", str(port), "--lookaside-port", "0"], env=env)
        assert r.exit_code == 8 and "already in use" in r.output
    r = CliRunner().invoke(main, ["registry", "start", "--port", str(free_port()), "--htpasswd", "kiln:s3cret",
                                  "--lookaside-port", "0"], env=env)
    assert r.exit_code == 2 and "password on the command line" in r.output and "s3cret" not in r.output
    r = CliRunner().invoke(main, ["registry", "start", "--port", str(free_port()), "--htpasswd", "kiln",
                                  "--lookaside-port", "0"], env=env)
    assert r.exit_code == 2 and "no password" in r.output
    r = CliRunner().invoke(main, ["registry", "start", "--port", str(free_port()), "--htpasswd", "kiln",
                                  "--password-stdin", "--lookaside-port", "0"], env=env, input="\n")
    assert r.exit_code == 2 and "no password" in r.output
