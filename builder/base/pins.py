"""The runtime's pins, checked against their index before any build work.

A class pins its inference runtime (`spec.runtime.version`) and Kiln pins the
rest of the wheel set (numpy). A pin that the index does not publish for the
image's Python and platform would only fail minutes into a build, inside
`pip download`; `check_pins` asks the index first (PEP 691 JSON simple API, one
request per package) and refuses with the spec's file and line and the nearest
versions the index does publish.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from builder.base.mirrors import BaseMirror, finalize_base_mirror, finalize_suites, served_versions
from builder.base.wheels import WheelTarget, finalize_target, make_wheelhouse, want_download
from builder.core import paths
from builder.core.errors import BuildError, SpecError
from builder.core.state import StateDir
from builder.spec.loader import load_merged
from builder.spec.schema import AcceleratorKind, HardwareClass

PYPI = "https://pypi.org/simple"
TIMEOUT = 20
NEAREST = 5


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    loc: tuple[str, ...] | None  # where the spec sets it (None: Kiln's own pin)


def finalize_pins(hc: HardwareClass, target: WheelTarget) -> tuple[Pin, ...]:
    """Every `name==version` of the wheel set, with the spec path of those the class sets."""
    pins = []
    for requirement in target.requirements:
        name, _, version = requirement.partition("==")
        name = name.split("[", 1)[0]  # onnxruntime-gpu[cuda,cudnn]: the extras' wheels are locked by hash
        own = canonicalize_name(name) == canonicalize_name(hc.spec.runtime.name.value)
        pins.append(Pin(name, version, ("spec", "runtime", "version") if own else None))
    return tuple(pins)


def finalize_tags(target: WheelTarget) -> frozenset[Tag]:
    """The wheel tags the image's pip accepts (its CPython, ABI and manylinux platforms)."""
    major, minor = (int(p) for p in target.python_version.split(".")[:2])
    abi = f"cp{major}{minor}"
    return frozenset([*cpython_tags((major, minor), [abi, "abi3", "none"], target.platforms),
                      *compatible_tags((major, minor), abi, target.platforms)])


def index_files(index: str, name: str) -> list[dict[str, object]]:
    """The files the index lists for `name` (JSON simple API); BuildError when unreachable."""
    url = f"{index.rstrip('/')}/{canonicalize_name(name)}/"
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310 (https index URL)
            data = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise BuildError(f"checking {name} on {index}: HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        raise BuildError(f"checking {name} on {index}: the index is unreachable ({exc})",
                         hint="the build needs this index for the runtime's wheels") from None
    files = data.get("files") if isinstance(data, dict) else None
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []


def published_versions(files: list[dict[str, object]], tags: frozenset[Tag]) -> list[Version]:
    """Versions with at least one non-yanked wheel the image can install, oldest first."""
    found = set()
    for f in files:
        if f.get("yanked"):
            continue
        try:
            _, version, _, wheel_tags = parse_wheel_filename(str(f.get("filename", "")))
        except (InvalidWheelFilename, InvalidVersion):
            continue  # sdists and odd names: the image installs wheels only
        if wheel_tags & tags:
            found.add(version)
    return sorted(found)


def finalize_nearest(pin: str, versions: list[Version], n: int = NEAREST) -> list[str]:
    """The published versions closest to `pin` in version order, newest first."""
    try:
        wanted = Version(pin)
    except InvalidVersion:
        return [str(v) for v in versions[-n:]][::-1]
    below = [v for v in versions if v < wanted]
    above = [v for v in versions if v > wanted]
    picked: list[Version] = []
    while len(picked) < n and (below or above):
        if above:
            picked.append(above.pop(0))
        if below and len(picked) < n:
            picked.append(below.pop())
    return [str(v) for v in sorted(picked, reverse=True)]


def check_pins(hc: HardwareClass, source: str, lines: dict[tuple[str, ...], str] | None = None) -> None:
    """Refuse (SpecError, exit 2) a wheel-set pin the index does not publish for the image."""
    target = finalize_target(hc)
    index = target.index or PYPI
    tags = finalize_tags(target)
    problems = []
    for pin in finalize_pins(hc, target):
        versions = published_versions(index_files(index, pin.name), tags)
        if any(str(v) == pin.version or v == _version_or_none(pin.version) for v in versions):
            continue
        nearest = finalize_nearest(pin.version, versions)
        where = (lines or {}).get(pin.loc, source) if pin.loc else source
        what = ".".join(pin.loc) if pin.loc else "Kiln's wheel set"
        seen = f"nearest published: {', '.join(nearest)}" if nearest else "the index publishes no such wheel at all"
        problems.append(f"{where}: {what}: {pin.name}=={pin.version} is not published on {index} for "
                        f"Python {target.python_version} {target.platform} ({seen})")
    if problems:
        raise SpecError(source, problems)


def check_driver_pins(hc: HardwareClass, source: str, lines: dict[tuple[str, ...], str] | None = None,
                      mirror: BaseMirror | None = None) -> None:
    """Refuse (SpecError) a driver version the base's mirror does not serve for every package the class
    pins to it (want_pinned_driver), naming the versions it does serve."""
    driver = hc.spec.accelerator.driver
    if driver is None or not want_pinned_driver(hc) or hc.spec.base.release is None:
        return
    mirror = mirror or finalize_base_mirror(hc)
    pairs = finalize_suites(hc.spec.base.release, mirror)
    wanted = set(driver.packages) | set(driver.build_packages)
    found = served_versions(pairs, tuple(hc.spec.base.components), hc.spec.architecture.debian_arch, wanted)
    where = (lines or {}).get(("spec", "accelerator", "driver", "version"), source)
    suites = ", ".join(suite for _, suite in pairs)
    problems = []
    for name in sorted(wanted):
        versions = sorted(found[name], key=_debian_key, reverse=True)
        if driver.version not in versions:
            serves = f"it serves {', '.join(versions)}" if versions else "it has no such package"
            problems.append(f"{where}: spec.accelerator.driver.version: {name}={driver.version} is not served by "
                            f"{mirror.url} ({suites}; {' '.join(hc.spec.base.components)}): {serves}")
        elif versions[0] != driver.version:
            print(f"warning: {name}={driver.version} is served but apt's candidate is {versions[0]}: dependencies "
                f"pinned to the same version (libnvidia-ptxjitcompiler1, nvidia-alternative) may not resolve",
                  file=sys.stderr)
    if problems:
        raise SpecError(source, problems)


def _debian_key(version: str) -> list[tuple[int, str]]:
    """An approximate Debian version order (enough to say which pin is newest)."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.+~:-]", version)]


def spec_lines(source: str) -> dict[tuple[str, ...], str]:
    """file:line of every spec path of the class file at `source` (empty when it is not a file)."""
    path = Path(source)
    if not path.is_absolute() and not path.is_file():
        path = paths.project_root() / path
    if not path.is_file():
        return {}
    return {tuple(str(p) for p in loc): where for loc, where in load_merged(path).lines.items()}


def _version_or_none(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def make_checked_wheelhouse(hc: HardwareClass, state: StateDir, source: str) -> Path:
    """The class's wheelhouse; before downloading one, its pins are checked against the index."""
    if want_download(hc, state):
        check_pins(hc, source, spec_lines(source))
    return make_wheelhouse(hc, state)


def want_pinned_driver(hc: HardwareClass) -> bool:
    """An NVIDIA dGPU driver on apt: every package pinned to driver.version, so the user space and the
    kernel modules (built in their own stage) are one version, whatever the mirror's candidate."""
    return hc.spec.accelerator.kind is AcceleratorKind.nvidia_dgpu and hc.spec.base.family.package_manager == "apt"
