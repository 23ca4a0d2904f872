"""The tests' own hygiene: what a run leaves behind (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import remove_disk_images

pytestmark = pytest.mark.unit


def test_disk_images_are_removed_and_nothing_else_nor_outside(tmp_path: Path) -> None:
    base, outside = tmp_path / "base", tmp_path / "outside"
    (base / "vm").mkdir(parents=True)
    outside.mkdir()
    for name in ("disk.raw", "vm/d.qcow2", "rootfs.tar"):
        (base / name).write_bytes(b"x")
    (base / "vm/console.log").write_text("kept")
    (outside / "keep.raw").write_bytes(b"x")
    (base / "link").symlink_to(outside, target_is_directory=True)
    (base / "link.raw").symlink_to(outside / "keep.raw")
    removed = remove_disk_images(base)
    assert sorted(p.relative_to(base).as_posix() for p in removed) == ["disk.raw", "rootfs.tar", "vm/d.qcow2"]
    assert (base / "vm/console.log").read_text() == "kept"
    assert (outside / "keep.raw").exists() and (base / "link.raw").is_symlink()
