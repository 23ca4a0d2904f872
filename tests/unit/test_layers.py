"""The layer store's pieces on their own: OCI whiteouts to overlayfs ones, and a layer whose bytes
are not its diff id refused (kiln_device.layers). Real GNU tar; whiteouts need root."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from kiln_device.contract import BAD_IMAGE, UNREACHABLE, WRITE_FAILED
from kiln_device.errors import AgentError
from kiln_device.layers import OPAQUE_XATTR, convert_whiteouts, extract, gc_store, measure, parse_manifest
from kiln_device.tools import classify

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


def fsverity_descriptor(path: Path) -> bytes:
    """fs-verity's descriptor of a small file (one Merkle level: up to 128 blocks of 4 KiB, SHA-256, no
    salt), written from the kernel's documentation: its SHA-256 is the file's digest."""
    data = path.read_bytes()
    assert 4096 < len(data) <= 128 * 4096
    blocks = [data[i:i + 4096].ljust(4096, b"\0") for i in range(0, len(data), 4096)]
    level = b"".join(hashlib.sha256(b).digest() for b in blocks).ljust(4096, b"\0")
    root = hashlib.sha256(level).digest()
    return (bytes([1, 1, 12, 0]) + bytes(4) + len(data).to_bytes(8, "little") + root.ljust(64, b"\0")
            + bytes(32) + bytes(144))


def test_a_layer_without_verity_is_hashed_whatever_its_path_says(tmp_path: Path) -> None:
    """`fsverity measure` fails on a file without fs-verity (a build host's disk, a layer not yet
    enabled); the digest is then computed. A directory named like a network error ("...eof...",
    as a random temp name was) once turned that into an "unreachable" failure of the disk build."""
    layer = tmp_path / "kiln-bench-boot-f3geofht" / "layer.erofs"
    layer.parent.mkdir()
    layer.write_bytes(b"\0" * 8192)
    digest, enabled = measure(layer)
    assert not enabled
    assert digest == "sha256:" + hashlib.sha256(fsverity_descriptor(layer)).hexdigest()
    assert classify(f"ERROR: FS_IOC_MEASURE_VERITY failed on '{layer}': No data available", WRITE_FAILED) \
        == WRITE_FAILED
    assert classify("reading blob sha256:ab: unexpected EOF", WRITE_FAILED) == UNREACHABLE
