"""A TCP proxy on 127.0.0.1 that a test can slow down and cut: a flaky link in front of a registry.

    with FaultyLink("127.0.0.1:5000", rate=2 * 2**20) as link:   # 2 MiB/s towards the client
        ...  # the device pulls through 127.0.0.1:<link.port> (10.0.2.2:<link.port> from a QEMU guest)
        link.wait_for(8 * 2**20)   # 8 MiB delivered
        link.cut()                 # open connections reset, new ones refused
        link.restore(rate=None)    # the link is back, at full speed

`delivered` counts the bytes sent to clients since the start (or since `reset_count`).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from types import TracebackType

CHUNK = 16 * 1024


class FaultyLink:
    def __init__(self, target: str, *, rate: float | None = None) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.rate = rate
        self.delivered = 0
        self.port = 0
        self._lock = threading.Lock()
        self._next_send = 0.0
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self.restore(rate)

    # --- control -------------------------------------------------------------------------------

    def restore(self, rate: float | None = None) -> None:
        """Listen again (same port after a cut), at `rate` bytes/s (None: no limit)."""
        self.rate = rate
        if self._listener is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(32)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accepting = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self._accepting.start()

    def cut(self) -> None:
        """The link goes down: every open connection is reset and the port refuses new ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):  # RST where it can: a pulled cable, not a clean close
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
            with contextlib.suppress(OSError):
                conn.close()

    def wait_for(self, delivered: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.delivered < delivered:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.delivered} of {delivered} bytes went through in {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> FaultyLink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        try:
            while data := src.recv(CHUNK):
                if to_client:
                    self._throttle(len(data))
                dst.sendall(data)
                if to_client:
                    with self._lock:
                        self.delivered += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def _throttle(self, size: int) -> None:
        rate = self.rate
        if not rate:
            return
        with self._lock:  # one budget for all connections: the link's bandwidth
            start = max(self._next_send, time.monotonic())
            self._next_send = start + size / rate
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)
