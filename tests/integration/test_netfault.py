"""The flaky link the OTA tests put between a device and its registry (tests/netfault.py)."""

from __future__ import annotations

import http.server
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.netfault import FaultyLink

pytestmark = pytest.mark.integration
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/blob", timeout=30) as resp:
        return bytes(resp.read())


def test_full_speed_passes_every_byte(server: str) -> None:
    with FaultyLink(server) as link:
        assert fetch(link.port) == PAYLOAD
        assert link.delivered > len(PAYLOAD)  # payload plus headers


def test_rate_limit_slows_the_transfer(server: str) -> None:
    with FaultyLink(server, rate=4 * 2**20) as link:
        start = time.monotonic()
        assert fetch(link.port) == PAYLOAD
        assert time.monotonic() - start >= 0.2  # 1 MiB at 4 MiB/s


def test_cut_breaks_a_transfer_refuses_new_ones_and_restore_brings_it_back(server: str) -> None:
    with FaultyLink(server, rate=1 * 2**20) as link:
        result: dict[str, object] = {}

        def pull() -> None:
            try:
                result["data"] = fetch(link.port)
            except Exception as exc:  # IncompleteRead, reset, ...: any failure is the point
                result["error"] = exc

        thread = threading.Thread(target=pull)
        thread.start()
        link.wait_for(256 * 1024, timeout=10)
        link.cut()
        thread.join(30)
        assert "error" in result or len(result.get("data", b"")) < len(PAYLOAD)  # type: ignore[arg-type]
        with pytest.raises(urllib.error.URLError):
            fetch(link.port)  # refused
        link.restore(rate=None)
        assert fetch(link.port) == PAYLOAD
