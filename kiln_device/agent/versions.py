"""Versions and decisions (pure): whether to take what the channel offers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiln_device.agent.errors import AgentError
from kiln_device.contract import (
    BLOCKLISTED,
    INCOMPATIBLE,
    LABEL_CLASS,
    LABEL_COMPATIBLE,
    LABEL_MIN_VERSION,
    LABEL_VERSION,
    NOT_NEWER,
    OK,
    UP_TO_DATE,
    Release,
)


def version_key(version: str) -> tuple[Any, ...]:
    """Order versions like SemVer 2.0: numeric dot parts compared as numbers (missing parts
    are 0), a pre-release (after '-' or '~') sorts before its release, build metadata
    (after '+', or '_' as in an image tag) is ignored. Non-numeric parts compare as text,
    after numbers. 1.2 < 1.10, 1.0.0-rc.1 < 1.0.0 = 1.0.0+b2."""
    core = re.split(r"[+_]", version, maxsplit=1)[0]
    m = re.match(r"^([^-~]*)(?:[-~](.*))?$", core)
    assert m is not None
    release, pre = m.group(1), m.group(2)

    def parts(text: str) -> list[tuple[int, int, str]]:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in text.split(".") if p != ""]

    rel = parts(release)
    while rel and rel[-1] == (0, 0, ""):
        rel.pop()
    # A release sorts after any of its pre-releases: (1,) > (0, ...).
    pre_key: tuple[Any, ...] = (1,) if pre is None else (0, tuple(parts(pre)))
    return (tuple(rel), pre_key)


def compare_versions(a: str, b: str) -> int:
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


@dataclass(frozen=True)
class Candidate:
    """What the channel offers (manifest digest and config labels)."""

    version: str
    compatible: str
    digest: str
    min_version: str | None = None
    cls: str | None = None


@dataclass(frozen=True)
class Decision:
    code: int
    reason: str

    @property
    def take(self) -> bool:
        return self.code == OK


def decide(running: Release, cand: Candidate, blocklist: Sequence[str] = ()) -> Decision:
    """Whether to take `cand`; the first reason that applies wins (the table in the tests)."""
    if cand.compatible != running.compatible:
        return Decision(INCOMPATIBLE, f"compatible {cand.compatible!r} is not this device's {running.compatible!r}")
    if cand.version in blocklist or cand.digest in blocklist:
        return Decision(BLOCKLISTED, f"{cand.version} ({cand.digest[:19]}) failed on this device before")
    order = compare_versions(cand.version, running.version)
    if order == 0:
        return Decision(UP_TO_DATE, f"{cand.version} is the running version")
    if order < 0:
        return Decision(NOT_NEWER, f"{cand.version} is older than the running {running.version} (no downgrades)")
    if running.min_version and compare_versions(cand.version, running.min_version) < 0:
        return Decision(NOT_NEWER, f"{cand.version} is below the running image's minVersion {running.min_version}")
    if cand.min_version and compare_versions(running.version, cand.min_version) < 0:
        return Decision(NOT_NEWER, f"{cand.version} needs {cand.min_version} or newer running first "
                                   f"(running {running.version})")
    return Decision(OK, f"{cand.version} is newer than the running {running.version}")


def candidate_from_labels(labels: dict[str, str], digest: str) -> Candidate:
    version = labels.get(LABEL_VERSION) or ""
    compatible = labels.get(LABEL_COMPATIBLE) or ""
    if not version or not compatible:
        raise AgentError(INCOMPATIBLE, f"image {digest[:19]} is not a Kiln release: labels {LABEL_VERSION} "
                                       f"and {LABEL_COMPATIBLE} are required")
    return Candidate(version=version, compatible=compatible, digest=digest,
                     min_version=labels.get(LABEL_MIN_VERSION) or None, cls=labels.get(LABEL_CLASS))
