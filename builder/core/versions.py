"""A release's version as the builder takes it: checked once against Kiln's one grammar into its one
type (kiln_device.version.Version, with its order and its renderings); and the time every image's
files carry."""

from __future__ import annotations

import re

from builder.core.errors import UsageError
from kiln_device.version import Version

DEFAULT_EPOCH = 1735689600  # 2025-01-01T00:00:00Z: file times and created dates in every image
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def release_version(value: Version | str, *, where: str = "version") -> Version:
    """VALUE as a Version; a string that is not one is a UsageError naming WHERE it came from."""
    try:
        version = Version.of(value)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    assert _TAG.fullmatch(version.tag), version  # the grammar is tag-safe
    return version
