"""Validators for values that reach a Containerfile, a shell line or a label.

Each returns the value unchanged or raises ValueError with a message that
says what is allowed. They whitelist characters; nothing is escaped later.
"""

from __future__ import annotations

import re

from kiln_device import version as kv

UNITS = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
         "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}

_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+._-]*(?:[=<>]{1,2}[A-Za-z0-9.+~:_-]+)?")
_KARG = re.compile(r"[A-Za-z0-9_.,:/=+@-]+")
_RELPATH = re.compile(r"[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)*")
_ABSPATH = re.compile(r"(?:/[A-Za-z0-9_.+-]+)+/?")
_PACKAGE_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]*")
_URL = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~/%+-]*)?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DEFAULTS = re.compile(r"_?[A-Za-z0-9][A-Za-z0-9_.-]*")
_LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9._/-]*")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_IMAGE = re.compile(r"[a-z0-9.-]+(?::[0-9]+)?(?:/[a-z0-9._-]+)+(?::[A-Za-z0-9._-]+)?")
_REGISTRY = re.compile(r"[a-z0-9.-]+(?::[0-9]+)?(?:/[a-z0-9._-]+)*")
_SNAPSHOT = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_WINDOW = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]")
_COMPATIBLE = re.compile(r"[a-z0-9][a-z0-9-]*,[a-z0-9][a-z0-9_.,/-]*")


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 60 else repr(value[:57] + "...")


def _match(pattern: re.Pattern[str], value: str, what: str, allowed: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{_shown(str(value))} is not a valid {what} (allowed: {allowed})")
    return value


def package_name(value: str) -> str:
    return _match(_PACKAGE, value, "package name",
                  "lowercase letters, digits, + . _ - and an optional =version")


def kernel_arg(value: str) -> str:
    return _match(_KARG, value, "kernel argument",
                  "one word of letters, digits and _ . , : / = + @ -; no spaces or quotes")


_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9A-Za-z][0-9A-Za-z.+!_-]*")


def requirement_pin(value: str) -> str:
    """A package pinned to one version: name==version."""
    return _match(_PIN, value, "pinned requirement", "name==version")


def relative_path(value: str) -> str:
    _match(_RELPATH, value, "relative path", "letters, digits, _ . + - separated by /")
    if ".." in value.split("/"):
        raise ValueError(f"{_shown(value)} must not contain '..'")
    return value


def absolute_path(value: str) -> str:
    _match(_ABSPATH, value, "absolute path", "/ followed by letters, digits, _ . + -")
    if ".." in value.split("/"):
        raise ValueError(f"{_shown(value)} must not contain '..'")
    return value


def version(value: str) -> str:
    """A Kiln version: the one grammar the builder, the agent and systemd-boot order alike (kiln_device.version)."""
    return kv.check(value)


def package_version(value: str) -> str:
    """A version someone else gives (a driver package, a wheel, a model): theirs, only made safe to use."""
    return _match(_PACKAGE_VERSION, value, "version", "letters, digits and . + ~ _ -")


def url(value: str) -> str:
    return _match(_URL, value, "URL", "http(s)://host[:port]/path with no spaces or quotes")


def name(value: str) -> str:
    return _match(_NAME, value, "name", "letters, digits and _ . -")


def defaults_name(value: str) -> str:
    return _match(_DEFAULTS, value, "defaults file name", "an optional _ then letters, digits and _ . -")


def label_key(value: str) -> str:
    return _match(_LABEL_KEY, value, "label key", "lowercase letters, digits and . _ / -")


RESERVED_LABEL_PREFIXES = ("dev.kiln.", "org.opencontainers.image.", "containers.bootc")


def user_label_key(value: str) -> str:
    """A label a spec may set: Kiln's own and the OCI annotations Kiln derives are not overridable."""
    label_key(value)
    reserved = next((p for p in RESERVED_LABEL_PREFIXES if value.startswith(p)), None)
    if reserved is not None:
        raise ValueError(f"{_shown(value)} is reserved: Kiln sets the {reserved}* labels itself "
                         "(devices and the agent read them); choose another key")
    return value


def label_value(value: str) -> str:
    if not isinstance(value, str) or any(ord(c) < 32 or c in '"\\$`' for c in value):
        raise ValueError(
            f"{_shown(str(value))} is not a valid label value "
            "(no control characters, newlines, quotes, backslashes, $ or `)"
        )
    return value


def byte_size(value: object) -> int:
    """'256MiB' -> 268435456; plain integers are bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size such as 512MiB or 2GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"{_shown(value)} is not a size (expected e.g. 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def digest(value: str) -> str:
    return _match(_DIGEST, value, "digest", "sha256: followed by 64 lowercase hex digits")


def image_ref(value: str) -> str:
    return _match(_IMAGE, value, "image reference",
                  "registry/path[:tag] in lowercase; pin the digest with `digest:`")


def registry(value: str) -> str:
    return _match(_REGISTRY, value, "registry", "host[:port][/path] in lowercase, no scheme")


def snapshot(value: str) -> str:
    return _match(_SNAPSHOT, value, "snapshot timestamp", "YYYYMMDDTHHMMSSZ")


def window(value: str) -> str:
    _match(_WINDOW, value, "maintenance window", "HH:MM-HH:MM in UTC, for example 02:00-04:30")
    if value[:5] == value[6:]:
        raise ValueError(f"{_shown(value)} is an empty window; leave `window` out for any time")
    return value


def compatible(value: str) -> str:
    return _match(_COMPATIBLE, value, "compatible string",
                  "'<vendor>,<class>' in lowercase letters, digits and - _ . , /")


def format_size(n: int) -> str:
    """268435456 -> '256 MiB'; at most two decimals, no trailing zeros (5.25 GiB, 1.5 KiB)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} B"
