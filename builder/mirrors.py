"""Where Debian packages come from: the base's mirror (a pinned snapshot, or the class's fallback
mirror when the snapshot is out of reach) and what a mirror's Packages index serves.
"""

from __future__ import annotations

from dataclasses import dataclass

from builder import names
from builder.net import reachable
from builder.spec import HardwareClass

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
    ref: str  # the base image's name (builder.names.base_ref)

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


