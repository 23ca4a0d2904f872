"""The names Kiln gives what it builds: image tags, local image references, registry destinations."""

from __future__ import annotations

import re

from builder.errors import UsageError

IMAGE_REPO = "localhost/kiln"
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def finalize_tag(version: str) -> str:
    """An OCI tag for a version: `+` (semver build metadata) becomes `_`."""
    tag = version.replace("+", "_")
    if not _TAG.fullmatch(tag):
        raise UsageError(f"version {version!r} cannot be an image tag (letters, digits, _ . - and +)")
    return tag


def image_ref(cls: str, version: str) -> str:
    """localhost/kiln/CLASS:TAG, the engine's name for a build."""
    return f"{IMAGE_REPO}/{cls}:{finalize_tag(version)}"


def finalize_destination(registry: str, cls: str, version: str) -> str:
    """REGISTRY/kiln/CLASS:TAG, where a push puts a build."""
    registry = registry.removeprefix("docker://").rstrip("/")
    if not registry or any(c in registry for c in " \t\n@"):
        raise UsageError(f"registry {registry!r} should look like host:port or host:port/path")
    return f"{registry}/kiln/{cls}:{finalize_tag(version)}"
