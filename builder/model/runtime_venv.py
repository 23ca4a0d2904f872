"""The class's inference runtime on the build host: a venv from the image's own wheelhouse.

    python = make_runtime_venv(hc, state, source)   # .kiln/runtimes/<wheelhouse key>/bin/python

The model gate measures candidates under the runtime the image ships (onnxruntime-openvino,
onnxruntime-gpu), not only the host's CPU onnxruntime. The venv is made once per wheel set
with `python -m venv` and `pip install --no-index --require-hashes` from the class's wheelhouse
(the bytes the image installs), and kept in Kiln's state directory. `why_not_host_runtime` says
when this host cannot run those wheels at all (another architecture, another Python).
"""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

from builder.base.pins import make_checked_wheelhouse
from builder.base.wheels import finalize_target, render_locked_requirements
from builder.core.errors import BuildError, CommandFailed
from builder.core.run import run
from builder.core.state import StateDir
from builder.spec.schema import HardwareClass

MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def want_runtime_venv(hc: HardwareClass, host_runtime: str, host_version: str) -> bool:
    """The class ships another runtime than the host's (name or version): measure it too."""
    rt = hc.spec.runtime
    return (rt.name.value, rt.version) != (host_runtime, host_version)


def why_not_host_runtime(hc: HardwareClass) -> str | None:
    """Why this host cannot install the class's wheels (None: it can)."""
    target = finalize_target(hc)
    machine = MACHINES.get(platform.machine().lower(), platform.machine())
    if not target.platform.endswith(machine):
        return (f"the class's runtime is built for {target.platform.split('_', 3)[-1]}; this host is {machine}: "
                f"measured with the host's CPU onnxruntime only")
    host_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if target.python_version != host_python:
        return (f"the class's image has Python {target.python_version}, this host {host_python}: its "
                f"{hc.spec.runtime.name.value} wheels do not install here; "
                f"measured with the host's CPU onnxruntime only")
    return None


def runtime_venv_dir(wheelhouse: Path, state: StateDir) -> Path:
    return state.root / "runtimes" / wheelhouse.name


def make_runtime_venv(hc: HardwareClass, state: StateDir, source: str) -> Path:
    """The venv's python, made once per wheel set (the wheelhouse is downloaded first if needed)."""
    wheelhouse = make_checked_wheelhouse(hc, state, source)
    dest = runtime_venv_dir(wheelhouse, state)
    python = dest / "bin" / "python"
    if (dest / "complete").is_file():
        return python
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    requirements = dest.parent / f"{dest.name}.requirements.txt"
    requirements.write_text(render_locked_requirements(wheelhouse))
    try:
        run([sys.executable, "-m", "venv", dest])
        run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
             "--find-links", wheelhouse, "--require-hashes", "--requirement", requirements])
    except CommandFailed as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise BuildError(f"installing {hc.spec.runtime.name.value} {hc.spec.runtime.version} on this host "
                         f"for the model gate: {exc}") from exc
    (dest / "complete").write_text(requirements.read_text())
    return python
