"""Can this machine build a class? Every reason it cannot, in plain words."""

from __future__ import annotations

import platform
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from builder import names
from builder.run import have_tool, run
from builder.spec import BaseSource, HardwareClass

PROBE_TIMEOUT = 2.0


def host_architecture() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def why_not_buildable(hc: HardwareClass, *, probe_network: bool = True, tools: bool = True) -> list[str]:
    """Every reason this machine cannot build `hc`; `tools=False` leaves out missing host tools
    (the build raises ToolMissing for those where they are actually needed)."""
    spec = hc.spec
    reasons = []
    if spec.architecture.value != host_architecture():
        reasons.append(f"{spec.architecture.value} image on a {host_architecture()} host: needs an "
                       f"{spec.architecture.value} builder (or qemu-user-static binfmt)")
    if tools and not (have_tool("podman") or have_tool("buildah")):
        reasons.append("no OCI engine: install podman (apt-get install podman runc)")
    if tools and spec.base.source is BaseSource.bootstrap and not have_tool("mmdebstrap"):
        reasons.append("bootstrap base needs mmdebstrap (apt-get install mmdebstrap)")
    if spec.base.source is BaseSource.registry and not _image_present(hc):
        reasons.append(f"base {spec.base.image} is not in local storage and needs a registry to pull from")
    urls = [r.url for r in spec.repositories]
    if spec.base.source is BaseSource.bootstrap and spec.base.mirror:
        urls.insert(0, spec.base.mirror)
    if spec.runtime.index:
        urls.append(spec.runtime.index)
    if probe_network and urls:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for url, ok in zip(urls, pool.map(reachable, urls), strict=True):
                if not ok:
                    reasons.append(f"needs {urlsplit(url).hostname} ({url}), unreachable from here")
    return reasons


def _image_present(hc: HardwareClass) -> bool:
    if not have_tool("podman") or hc.spec.base.image is None:
        return False
    return run(["podman", "image", "exists", names.base_ref(hc)], check=False, quiet=True).returncode == 0
