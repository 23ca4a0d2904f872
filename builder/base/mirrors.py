"""Where Debian packages come from: the base's mirror (a pinned snapshot, or the class's fallback
mirror when the snapshot is out of reach) and what a mirror's Packages index serves.
"""

from __future__ import annotations

import lzma
import urllib.error
import urllib.request
from dataclasses import dataclass

from builder.core.errors import BuildError
from builder.core.net import reachable
from builder.spec import names
from builder.spec.schema import HardwareClass

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SNAPSHOT_MIRROR = "http://snapshot.debian.org/archive"


def finalize_mirrors(mirror: str | None, snapshot: str | None) -> tuple[str, str | None]:
    """The main mirror and the security mirror (None where it cannot be derived)."""
    if snapshot:
        return f"{SNAPSHOT_MIRROR}/debian/{snapshot}", f"{SNAPSHOT_MIRROR}/debian-security/{snapshot}"
    mirror = (mirror or DEFAULT_MIRROR).rstrip("/")
    return mirror, mirror + "-security" if mirror.endswith("/debian") else None


@dataclass(frozen=True)
class BaseMirror:
    """Where a class's bootstrap base comes from on this machine."""

    url: str  # the main mirror mmdebstrap reads
    snapshot: str | None  # the snapshot the base is pinned to; None: a moving mirror
    fallback: bool  # spec.base.fallbackMirror stands in for the unreachable snapshot
    ref: str  # the base image's name (builder.spec.names.base_ref)

    @property
    def note(self) -> str:
        if not self.fallback:
            return ""
        return (f"base from the fallback mirror {self.url}, unpinned (the snapshot mirror is unreachable "
                f"from here): named {self.ref}, recorded in build.json and the dev.kiln.base.* labels")


def finalize_base_mirror(hc: HardwareClass, *, probe: bool = True) -> BaseMirror:
    """The pinned snapshot's mirror, or spec.base.fallbackMirror when `probe` finds the snapshot
    unreachable and the class names one."""
    base = hc.spec.base
    main, _ = finalize_mirrors(base.mirror, base.snapshot)
    if probe and base.snapshot and base.fallback_mirror and not reachable(main):
        return BaseMirror(url=base.fallback_mirror.rstrip("/"), snapshot=None, fallback=True,
                          ref=names.base_ref(hc, fallback=True))
    return BaseMirror(url=main, snapshot=base.snapshot, fallback=False, ref=names.base_ref(hc))




# --- what a mirror serves ---------------------------------------------------------------------

INDEX_TIMEOUT = 30


def finalize_suites(release: str, mirror: BaseMirror) -> list[tuple[str, str]]:
    """(mirror URL, suite) pairs the base's apt sources name: release, -updates, and -security."""
    main, security = (mirror.url, finalize_mirrors(mirror.url, None)[1]) if mirror.snapshot is None else \
        finalize_mirrors(None, mirror.snapshot)
    pairs = [(main, release), (main, f"{release}-updates")]
    if security:
        pairs.append((security, f"{release}-security"))
    return pairs


def served_versions(pairs: list[tuple[str, str]], components: tuple[str, ...], arch: str,
                    wanted: set[str]) -> dict[str, set[str]]:
    """The versions of each package in `wanted` that the suites' Packages indexes list."""
    found: dict[str, set[str]] = {name: set() for name in wanted}
    for url, suite in pairs:
        for component in components:
            index = f"{url.rstrip('/')}/dists/{suite}/{component}/binary-{arch}/Packages.xz"
            _collect(fetch_index(index), wanted, found)
    return found


def fetch_index(url: str) -> str:
    """A Packages.xz, decompressed; empty when the mirror has none (404: a suite without that component)."""
    try:
        with urllib.request.urlopen(url, timeout=INDEX_TIMEOUT) as response:  # noqa: S310 (the class's mirror)
            return lzma.decompress(response.read()).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return ""
        raise BuildError(f"reading {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError, lzma.LZMAError) as exc:
        raise BuildError(f"reading {url}: {exc}", hint="the build needs this mirror for the driver") from None


def _collect(text: str, wanted: set[str], found: dict[str, set[str]]) -> None:
    name = None
    for line in text.splitlines():
        if line.startswith("Package: "):
            name = line[9:].strip()
        elif line.startswith("Version: ") and name in wanted:
            found[name].add(line[9:].strip())
