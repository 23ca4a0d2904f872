"""The layer store's pieces on their own: OCI whiteouts to overlayfs ones, and a layer whose bytes
are not its diff id refused (kiln_device.agent.layers). Real GNU tar; whiteouts need root."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from kiln_device.agent.errors import AgentError
from kiln_device.agent.layers import OPAQUE_XATTR, convert_whiteouts, extract, gc_store, parse_manifest
from kiln_device.contract import BAD_IMAGE

pytestmark = pytest.mark.unit
needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="whiteouts are device nodes and trusted.* xattrs: root only")


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@needs_root
def test_whiteouts_become_overlayfs_whiteouts(tmp_path: Path) -> None:
    raw = tar_of({"etc/.wh.gone": b"", "usr/share/.wh..wh..opq": b"", "usr/share/new": b"x"})
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(raw))
    tree = tmp_path / "tree"
    tree.mkdir()
    extract(blob, hashlib.sha256(raw).hexdigest(), tree, 60)
    gone = (tree / "etc/gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert os.getxattr(tree / "usr/share", OPAQUE_XATTR) == b"y"
    assert sorted(os.listdir(tree / "usr/share")) == ["new"]
    assert not (tree / "etc/.wh.gone").exists()


@needs_root
def test_a_whiteout_beside_its_own_layers_entry_hides_only_lower_layers(tmp_path: Path) -> None:
    """OCI: a whiteout applies to lower layers; the same layer's file stays, and its directory of
    that name replaces the lower one whole (opaque). It used to be refused and blocklisted."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "x").write_text("kept")
    (tree / ".wh.x").write_text("")
    (tree / ".wh.d").write_text("")
    assert convert_whiteouts(tree) == 2
    assert sorted(os.listdir(tree)) == ["d", "x"] and (tree / "x").read_text() == "kept"
    assert os.getxattr(tree / "d", OPAQUE_XATTR) == b"y"


def test_a_layer_that_is_not_its_diff_id_is_refused(tmp_path: Path) -> None:
    raw = tar_of({"a": b"1"})
    blob = tmp_path / "blob"
    blob.write_bytes(raw)  # plain tar: also read
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(AgentError) as err:
        extract(blob, "0" * 64, tree, 60)
    assert err.value.code == BAD_IMAGE and "not its diff id" in err.value.message


def test_a_corrupt_gzip_layer_is_refused(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(tar_of({"a": b"1" * 10000}))[:-40] + b"\0" * 40)
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(AgentError) as err:
        extract(blob, "0" * 64, tree, 60)
    assert err.value.code == BAD_IMAGE


def test_gc_keeps_the_layers_a_slot_names(tmp_path: Path) -> None:
    keep, drop = "a" * 64, "b" * 64
    for name in (f"{keep}.erofs", f"{keep}.verity", f"{drop}.erofs", f"{drop}.verity", f"{drop}.tmp"):
        (tmp_path / name).write_bytes(b"12345")
    (tmp_path / ".work").mkdir()
    assert gc_store(tmp_path, parse_manifest(f"{keep} sha256:{'0' * 64}\nnot a line\n")) == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == [".work", f"{keep}.erofs", f"{keep}.verity"]
