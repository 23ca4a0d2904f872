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
from builder.build import build_class
from builder.context import Context, make_context
from builder.engine import PodmanEngine
from builder.loader import load_class
from builder.state import StateDir, make_state_dir
from tests.conftest import ROOT, require_tool

QEMU_VERSION = "1.0.0"
TEST_STATE = Path(os.environ.get("KILN_TEST_STATE_DIR") or ROOT / ".kiln" / "test-state")

# The kernel modules qemu-x86_64 leaves out of its base: the container tier's base is that class's.
QEMU_BASE_MODULES = tuple(load_class(QEMU_CLASS, ROOT / "images").spec.kernel.drop_modules)

_built: dict[tuple[str, str], dict[str, Any]] = {}


def kiln_test_state() -> StateDir:
    return make_state_dir(root=TEST_STATE)


def kiln_test_context(state: StateDir | None = None) -> Context:
    """A Context on the test store (or STATE) with podman, quiet about nothing."""
    state = state or kiln_test_state()
    return make_context(PodmanEngine(state), state=state)


def qemu_image(state: StateDir | None = None, version: str = QEMU_VERSION) -> dict[str, Any]:
    """The build record of qemu-x86_64 VERSION, built into the test store (once per session)."""
    for tool in ("podman", "runc", "mmdebstrap"):
        require_tool(tool)
    state = state or kiln_test_state()
    key = (str(state.root), version)
    if key not in _built:
        hc = load_class(QEMU_CLASS, ROOT / "images")
        _built[key] = build_class(kiln_test_context(state), hc, source=f"images/{QEMU_CLASS}.yaml", version=version)
    return _built[key]
