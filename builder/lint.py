"""Image lints from the build machine: the same module that runs inside images.

The implementation lives in overlays/ (standard library only) so that one copy
runs both as the last step of an image build and here on an unpacked rootfs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from builder import paths
from builder.errors import GateFailed

LINT_MODULE = Path("common/usr/lib/kiln/kiln_lint.py")


def load_lint_module() -> ModuleType:
    path = paths.PACKAGE_DIR.parent / "overlays" / LINT_MODULE
    spec = importlib.util.spec_from_file_location("kiln_lint", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kiln_lint", module)
    spec.loader.exec_module(module)
    return module


def lint_rootfs(root: Path) -> list[object]:
    """Run every lint; raise GateFailed listing the errors, return all findings."""
    mod = load_lint_module()
    findings = mod.run_lints(root)
    errors = [f for f in findings if f.severity == mod.ERROR]
    if errors:
        lines = "\n".join(f"  {f.lint}: {f.message}" for f in errors)
        raise GateFailed(f"image lints failed on {root}:\n{lines}")
    return list(findings)
