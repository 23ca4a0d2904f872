"""Where things are: the project root (specs, models, overlays) and outputs."""

from __future__ import annotations

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
