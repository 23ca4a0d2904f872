"""Image lints from the build machine: the same module that runs inside images.

The implementation is kiln_device.lint (standard library only), so that one copy
runs both as the last step of an image build and here on an unpacked rootfs.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from builder.core.errors import GateFailed
from kiln_device import lint


def lint_rootfs(root: Path) -> list[lint.Finding]:
    """Run every lint; raise GateFailed listing the errors, return all findings."""
    findings = lint.run_lints(root)
    errors = [f for f in findings if f.severity == lint.ERROR]
    if errors:
        lines = "\n".join(f"  {f.lint}: {f.message}" for f in errors)
        raise GateFailed(f"image lints failed on {root}:\n{lines}")
    return findings


def load_lint_module() -> ModuleType:
    """kiln_device.lint (kept for callers that still ask for the module: `kiln lint` counts LINTS)."""
    return lint
