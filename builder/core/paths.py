"""Where things are: the project root (specs, models, overlays) and every output under build/.

    build/<class>/<tag>/build.json          record_path(cls, version)   (tag: the version, + as _)
    build/<class>/<tag>/context/            context_dir(cls, version)   what `kiln build` rendered
    build/<class>/<tag>/disk.<fmt>          disk_path(cls, version, fmt)
    build/<class>/context/                  render_dir(cls)             `kiln render`'s default
    build/<class>/models/<model>/<version>/ model_dir(cls, model, version)
    build/<class>/ssh/id_ed25519            ssh_key_path(cls)           development classes' test key
    build/<class>/dev-release-key/          dev_signing_key_dir(cls)    development classes' release key
    build/adhoc/<name>/                     adhoc_model_dir(name)       `kiln model optimize --model`

Nothing else spells these paths: builder, tests and bench call these functions.
"""

from __future__ import annotations

import os
from pathlib import Path

from builder.core.versions import release_version
from kiln_device.version import Version

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # builder/


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


def class_dir(cls: str) -> Path:
    return build_dir() / cls


def release_dir(cls: str, version: Version | str) -> Path:
    return class_dir(cls) / release_version(version).tag


def record_path(cls: str, version: Version | str) -> Path:
    return release_dir(cls, version) / "build.json"


def find_record_paths(cls: str) -> list[Path]:
    """Every build.json of CLASS, oldest first (by modification time)."""
    return sorted(class_dir(cls).glob("*/build.json"), key=lambda p: p.stat().st_mtime)


def context_dir(cls: str, version: Version | str) -> Path:
    return release_dir(cls, version) / "context"


def disk_path(cls: str, version: Version | str, fmt: str) -> Path:
    return release_dir(cls, version) / f"disk.{fmt}"


def render_dir(cls: str) -> Path:
    return class_dir(cls) / "context"


def model_dir(cls: str, model: str, version: str) -> Path:
    return class_dir(cls) / "models" / model / version


def adhoc_model_dir(name: str) -> Path:
    return build_dir() / "adhoc" / name


def ssh_key_path(cls: str) -> Path:
    return class_dir(cls) / "ssh" / "id_ed25519"


def dev_signing_key_dir(cls: str) -> Path:
    return class_dir(cls) / "dev-release-key"
