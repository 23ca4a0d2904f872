"""The inference runtime's wheelhouse: downloaded on the host, installed offline in the image.

The image never talks to PyPI. `make_wheelhouse` runs `pip download` on the
build machine for the image's Python and platform (not the host's), keeps
the wheels in `.kiln/wheels/<key>/`, and `render_locked_requirements` pins
every wheel by name, version and sha256, so the image's
`pip install --no-index --require-hashes` installs exactly these bytes (or
fails). Same spec, same wheels, same layer: part of the reproducible build.

Why on the host: the build machine may reach PyPI only through a proxy with
its own CA (the container would have to be taught to trust it), and a
device image should not depend on an index being up at build time anyway.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import BuildError, CommandFailed
from builder.core.files import sha256_file
from builder.core.run import run
from builder.core.state import StateDir
from builder.spec.schema import Architecture, Family, HardwareClass

NUMPY = "numpy==2.2.6"
# The device agent's own venv (/usr/lib/kiln/agent-venv): python-tuf for trusted channels, the
# versions the builder's own venv uses (pyproject.toml). Apart from the runtime venv, so that a
# broken runtime never takes the updater down with it.
AGENT_REQUIREMENTS = ("tuf==7.0.1", "securesystemslib[crypto]==1.6.0")

# The image's Python and glibc per family (what `pip download` must target).
TARGETS: dict[Family, tuple[str, str]] = {
    Family.debian: ("3.11", "2_36"),  # bookworm
    Family.l4t: ("3.10", "2_35"),  # Ubuntu jammy
    Family.fedora_bootc: ("3.13", "2_40"),  # Fedora 41
    Family.centos_bootc: ("3.11", "2_34"),  # CentOS Stream 9, python3.11
}
_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)-.*\.whl$")


@dataclass(frozen=True)
class WheelTarget:
    requirements: tuple[str, ...]
    python_version: str
    platform: str  # manylinux_2_<glibc>_<machine>: the newest tag the image accepts
    index: str | None

    @property
    def platforms(self) -> tuple[str, ...]:
        """Every manylinux tag the image's glibc accepts: pip does not expand an explicit one."""
        _, _, glibc, machine = self.platform.split("_", 3)
        newest = int(glibc)
        return (*(f"manylinux_2_{m}_{machine}" for m in range(newest, 16, -1)), f"manylinux2014_{machine}")

    def key(self) -> str:
        data = json.dumps([self.requirements, self.python_version, self.platform, self.index])
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def finalize_target(hc: HardwareClass) -> WheelTarget:
    rt = hc.spec.runtime
    python, glibc = TARGETS[hc.spec.base.family]
    machine = "aarch64" if hc.spec.architecture is Architecture.aarch64 else "x86_64"
    extras = f"[{','.join(rt.extras)}]" if rt.extras else ""  # e.g. the CUDA 12 wheels of onnxruntime-gpu
    return WheelTarget(requirements=(f"{rt.name.value}{extras}=={rt.version}", NUMPY), python_version=python,
                       platform=f"manylinux_{glibc}_{machine}", index=rt.index)


def finalize_agent_target(hc: HardwareClass) -> WheelTarget:
    """The agent's wheels for the class's image (its Python and platform), from PyPI."""
    runtime = finalize_target(hc)
    return WheelTarget(requirements=AGENT_REQUIREMENTS, python_version=runtime.python_version,
                       platform=runtime.platform, index=None)


def pip_download_argv(target: WheelTarget, dest: Path) -> list[str]:
    argv = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--only-binary=:all:", "--dest", str(dest),
        "--python-version", target.python_version, "--implementation", "cp",
        "--abi", f"cp{target.python_version.replace('.', '')}",
    ]  # fmt: skip
    for platform in target.platforms:
        argv += ["--platform", platform]
    if target.index:
        argv += ["--extra-index-url", target.index]
    return [*argv, *target.requirements]


def make_wheelhouse(hc: HardwareClass, state: StateDir) -> Path:
    """Download (once) the runtime's wheels for the class's image; return their directory."""
    return make_target_wheelhouse(finalize_target(hc), state, "the inference runtime")


def make_agent_wheelhouse(hc: HardwareClass, state: StateDir) -> Path:
    """Download (once) the agent venv's wheels (python-tuf) for the class's image."""
    return make_target_wheelhouse(finalize_agent_target(hc), state, "the device agent's trust libraries")


def make_target_wheelhouse(target: WheelTarget, state: StateDir, what: str) -> Path:
    dest = wheelhouse_dir(target, state)
    if (dest / "complete").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        run(pip_download_argv(target, tmp))
    except CommandFailed as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(f"downloading {what} ({', '.join(target.requirements)}) for "
                         f"Python {target.python_version} {target.platform}: {exc}") from exc
    (tmp / "complete").write_text(json.dumps(target.requirements) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def wheelhouse_dir(target: WheelTarget, state: StateDir) -> Path:
    return state.root / "wheels" / target.key()


def want_download(hc: HardwareClass, state: StateDir) -> bool:
    """The class's wheel set is not in the store yet (make_wheelhouse would download it)."""
    return not (wheelhouse_dir(finalize_target(hc), state) / "complete").is_file()


def wheel_files(wheelhouse: Path) -> list[Path]:
    return sorted(wheelhouse.glob("*.whl"))


def render_locked_requirements(wheelhouse: Path) -> str:
    """`name==version --hash=sha256:...` for every wheel: pip's --require-hashes input."""
    lines = ["# Locked by kiln from the wheelhouse: installed with --no-index --require-hashes"]
    for wheel in wheel_files(wheelhouse):
        found = _WHEEL.match(wheel.name)
        if not found:
            raise BuildError(f"{wheel}: not a wheel file name")
        lines.append(f"{found['name']}=={found['version']} --hash=sha256:{sha256_file(wheel)}")
    return "\n".join(lines) + "\n"
