"""Versions and decisions (pure): whether to take what the channel offers."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from kiln_device import version as kv
from kiln_device.contract import (
    BAD_IMAGE,
    BLOCKLISTED,
    CLASS_RE,
    COMPATIBLE_RE,
    INCOMPATIBLE,
    LABEL_CLASS,
    LABEL_COMPATIBLE,
    LABEL_DEVELOPMENT,
    LABEL_MIN_VERSION,
    LABEL_VERSION,
    MAX_LABEL_LENGTH,
    NOT_NEWER,
    OK,
    UP_TO_DATE,
    VERSION_RE,
    Release,
    entry_text,
)
from kiln_device.errors import AgentError


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1: Kiln's one order (SemVer on the one grammar, kiln_device.version), which is
    systemd-boot's order of the boot entries (proven in tests/unit/test_version.py). A version of
    an older grammar (the running image of a device built before it) is ordered as systemd-boot
    orders its entry, so the agent never expects the boot loader to prefer another entry than
    it will."""
    if kv.is_valid(a) and kv.is_valid(b):
        return kv.compare(a, b)
    return kv.strverscmp_improved(entry_text(a), entry_text(b))


version_key = functools.cmp_to_key(compare_versions)


@dataclass(frozen=True)
class Candidate:
    """What the channel offers (manifest digest and config labels)."""

    version: str
    compatible: str
    digest: str
    min_version: str | None = None
    cls: str | None = None
    development: bool | None = None  # None: the image does not say (built before the label existed)
    # True: from verified TUF metadata alone (an update reads the labels only once it has fetched the image)
    from_channel: bool = False


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
    if cand.development and not running.development:
        return Decision(INCOMPATIBLE, f"{cand.version} is a development image and this device runs a production "
                                      f"image ({running.version}): development images never go to production devices")
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
    """The candidate an image's labels describe, each label checked before anything uses it
    (they come from the registry: unverified at check time)."""
    version = labels.get(LABEL_VERSION) or ""
    compatible = labels.get(LABEL_COMPATIBLE) or ""
    if not version or not compatible:
        raise AgentError(INCOMPATIBLE, f"image {digest[:19]} is not a Kiln release: labels {LABEL_VERSION} "
                                       f"and {LABEL_COMPATIBLE} are required")
    rules = ((LABEL_VERSION, VERSION_RE, kv.GRAMMAR),
             (LABEL_MIN_VERSION, VERSION_RE, kv.GRAMMAR),
             (LABEL_COMPATIBLE, COMPATIBLE_RE, "<vendor>,<class>: lowercase letters, digits and _ . , / -"),
             (LABEL_CLASS, CLASS_RE, "letters, digits and _ . -"))
    for key, pattern, allowed in rules:
        value = labels.get(key) or ""
        if value and not (isinstance(value, str) and len(value) <= MAX_LABEL_LENGTH and pattern.fullmatch(value)):
            text = str(value)
            shown = repr(text[:40] + "...") if len(text) > 40 else repr(text)
            raise AgentError(BAD_IMAGE, f"image {digest[:19]} has a malformed label {key}={shown} ({len(text)} "
                                        f"characters; allowed: {allowed}, at most {MAX_LABEL_LENGTH})")
    development = labels.get(LABEL_DEVELOPMENT) or None
    if development not in (None, "true", "false"):
        raise AgentError(BAD_IMAGE, f"image {digest[:19]} has a malformed label {LABEL_DEVELOPMENT}="
                                    f"{str(development)[:40]!r} (allowed: true, false)")
    return Candidate(version=version, compatible=compatible, digest=digest,
                     min_version=labels.get(LABEL_MIN_VERSION) or None, cls=labels.get(LABEL_CLASS) or None,
                     development=None if development is None else development == "true")
