"""The names Kiln gives what it builds: image tags, local image references, registry destinations,
and the base image a class builds FROM."""

from __future__ import annotations

import hashlib
import re

from builder.core.errors import UsageError
from builder.core.versions import release_version
from builder.spec.schema import BaseSource, Family, HardwareClass
from kiln_device.version import Version

IMAGE_REPO = "localhost/kiln"
BASE_REPO = f"{IMAGE_REPO}/base"
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def image_ref(cls: str, version: Version | str) -> str:
    """localhost/kiln/CLASS:TAG, the engine's name for a build."""
    return f"{IMAGE_REPO}/{cls}:{release_version(version).tag}"


def os_stage_ref(cls: str) -> str:
    """The OS stage of CLS's last build (builder.image.rechunk rewrites it; the image is built FROM that)."""
    return f"localhost/kiln/{cls}/os-stage:latest"


def finalize_destination(registry: str, cls: str, version: Version | str) -> str:
    """REGISTRY/kiln/CLASS:TAG, where a push puts a build."""
    registry = registry.removeprefix("docker://").rstrip("/")
    if not registry or any(c in registry for c in " \t\n@"):
        raise UsageError(f"registry {registry!r} should look like host:port or host:port/path")
    return f"{registry}/kiln/{cls}:{release_version(version).tag}"


def offline_base_ref(release: str, arch: str, snapshot: str | None = None, *, distro: str = "debian",
                     unpinned: str | None = None, modules: str | None = None) -> str:
    """localhost/kiln/base/DISTRO:RELEASE[-SNAPSHOT|-unpinned-ID][-ARCH], the base `kiln base` bootstraps.

    x86_64 keeps the bare tag; any other architecture appends `-ARCH`, so the two never share a tag.
    `unpinned` (finalize_unpinned_id) names a base bootstrapped from a moving mirror in place of an
    unreachable snapshot (spec.base.fallbackMirror): it never carries the snapshot's name.
    `modules` (finalize_modules_id) names a base that leaves kernel modules out (spec.kernel.dropModules).
    """
    if snapshot and unpinned:
        raise ValueError("a base is either pinned to a snapshot or unpinned, not both")
    tag = release + (f"-{snapshot}" if snapshot else "") + (f"-unpinned-{unpinned}" if unpinned else "")
    tag += f"-modules-{modules}" if modules else ""
    tag += "" if arch == "x86_64" else f"-{arch}"
    return f"{BASE_REPO}/{distro}:{tag}"


def finalize_module_dirs(drop_modules: tuple[str, ...]) -> tuple[str, ...]:
    """A set of dropped module directories in one spelling: sorted, without slashes at the ends."""
    return tuple(sorted({d.strip("/") for d in drop_modules}))


def finalize_modules_id(drop_modules: tuple[str, ...]) -> str:
    """8 hex digits naming a set of dropped module directories (order and slashes do not matter)."""
    return hashlib.sha256(" ".join(finalize_module_dirs(drop_modules)).encode()).hexdigest()[:8]


def finalize_unpinned_id(mirror: str, components: tuple[str, ...]) -> str:
    """8 hex digits of the mirror and components an unpinned base came from (two never share a tag)."""
    return hashlib.sha256(f"{mirror.rstrip('/')} {' '.join(components)}".encode()).hexdigest()[:8]


def base_ref(hc: HardwareClass, *, fallback: bool = False) -> str:
    """What the class builds FROM: its registry image (pinned by digest when the spec gives one)
    or the offline base (offline_base_ref); `fallback`: the base from spec.base.fallbackMirror."""
    base = hc.spec.base
    if base.source is BaseSource.registry:
        assert base.image is not None
        return f"{base.image}@{base.digest}" if base.digest else base.image
    assert base.release is not None  # builder.spec.rules.base_source: a bootstrap base names its release
    distro = "ubuntu" if base.family is Family.l4t else "debian"
    drop = hc.spec.kernel.drop_modules
    modules = finalize_modules_id(tuple(drop)) if drop else None
    if fallback:
        assert base.fallback_mirror is not None  # builder.spec.rules: only with a fallback mirror
        unpinned = finalize_unpinned_id(base.fallback_mirror, tuple(base.components))
        return offline_base_ref(base.release, hc.spec.architecture.value, distro=distro, unpinned=unpinned,
                                modules=modules)
    return offline_base_ref(base.release, hc.spec.architecture.value, base.snapshot, distro=distro, modules=modules)
