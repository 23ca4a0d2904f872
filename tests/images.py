"""Built images shared by the container and vm tiers.

`qemu_image(state)` builds (or, with a warm cache, rebuilds in seconds) the
embedded default class into the test state dir's store and returns its build
record. Both tiers call it with the same state dir, so one pytest run builds
the image once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.projects import QEMU_CLASS
from builder.core.context import Context, make_context
from builder.core.engine import PodmanEngine
from builder.core.state import StateDir, make_state_dir
from builder.image.build import build_class
from builder.spec.loader import load_class
from tests.conftest import ROOT, require_tool

QEMU_VERSION = "1.0.0"
ARM64_CLASS = "arm64-vision"
JETSON_STAND_IN = "jetson-vision-standard-stand-in"  # jetson-vision-standard without L4T (builder.spec.stand_in)
TEST_STATE = Path(os.environ.get("KILN_TEST_STATE_DIR") or ROOT / ".kiln" / "test-state")

# The kernel modules qemu-x86_64 leaves out of its base: the container tier's base is that class's.
QEMU_BASE_MODULES = tuple(load_class(QEMU_CLASS, ROOT / "images").spec.kernel.drop_modules)

_built: dict[tuple[str, str, str], dict[str, Any]] = {}


def kiln_test_state() -> StateDir:
    return make_state_dir(root=TEST_STATE)


def kiln_test_context(state: StateDir | None = None) -> Context:
    """A Context on the test store (or STATE) with podman, quiet about nothing."""
    state = state or kiln_test_state()
    return make_context(PodmanEngine(state), state=state)


def qemu_image(state: StateDir | None = None, version: str = QEMU_VERSION) -> dict[str, Any]:
    """The build record of qemu-x86_64 VERSION, built into the test store (once per session)."""
    return class_image(QEMU_CLASS, state, version)


def arm64_image(state: StateDir | None = None, version: str = QEMU_VERSION, cls: str = ARM64_CLASS) -> dict[str, Any]:
    """The build record of arm64-vision (or another arm64 CLS) VERSION, through qemu-user on an x86_64
    host, once per session."""
    from builder.base.emulation import why_not_emulated
    from builder.spec.schema import Architecture

    why = why_not_emulated(Architecture.aarch64)
    if why is not None:
        require_tool(f"qemu-user for arm64 ({why})")
    return class_image(cls, state, version)


def class_image(cls: str, state: StateDir | None = None, version: str = QEMU_VERSION) -> dict[str, Any]:
    """The build record of CLS VERSION, built into the test store (once per session)."""
    for tool in ("podman", "runc", "mmdebstrap"):
        require_tool(tool)
    state = state or kiln_test_state()
    key = (str(state.root), cls, version)
    if key not in _built:
        hc = load_class(cls, ROOT / "images")
        _built[key] = build_class(kiln_test_context(state), hc, source=f"images/{hc.file_name}", version=version)
    return _built[key]
