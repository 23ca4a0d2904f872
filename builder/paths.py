"""Where things are: the project root (specs, models, overlays) and outputs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """KILN_PROJECT_DIR, else the working directory if it has images/, else the checkout."""
    env = os.environ.get("KILN_PROJECT_DIR")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd()
    if (cwd / "images").is_dir():
        return cwd
    return PACKAGE_DIR.parent


def images_dir() -> Path:
    return project_root() / "images"


def overlays_dir() -> Path:
    return project_root() / "overlays"


def build_dir() -> Path:
    return project_root() / "build"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
