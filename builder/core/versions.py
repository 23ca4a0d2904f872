"""A release's version as the builder takes it: checked once against Kiln's one grammar
(kiln_device.version), then rendered as an OCI tag; and the time every image's files carry."""

from __future__ import annotations

import re

from builder.core.errors import UsageError
from kiln_device import version as kv

DEFAULT_EPOCH = 1735689600  # 2025-01-01T00:00:00Z: file times and created dates in every image
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def finalize_tag(version: str) -> str:
    """An OCI tag for a version: the version itself (the grammar, kiln_device.version, is tag-safe)."""
    try:
        kv.check(version)
    except ValueError as exc:
        raise UsageError(f"version: {exc}") from None
    assert _TAG.fullmatch(version), version
    return version
