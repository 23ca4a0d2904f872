"""Network helpers: a free TCP port on the loopback; whether a URL's host answers."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

PROBE_TIMEOUT = 2.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the URL's host and port opens within `timeout` seconds."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
