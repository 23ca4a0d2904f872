"""The layer store: one erofs per OCI layer on the data partition, shared by both slots.

An image that carries the `dev.kiln.root-layers` label boots from a stack of layers: its slot
holds only a small erofs with `/kiln-layers` (each layer's diff id and fs-verity digest, bottom
first), and the initramfs checks each layer's digest, loop-mounts it and stacks the layers with
overlayfs (docs/ota.md, "Layered slots"). An update then writes only the layers the device does
not have yet.

A layer file is written once, under its diff id, and never changed: made as `<id>.tmp`, fsynced,
fs-verity enabled where the filesystem supports it, then renamed. Its expected digest is kept
beside it (`<id>.verity`); a reused layer is measured again and rebuilt when it does not match.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kiln_device.common import CHUNK, fsync_dir, fsync_file, read_json, write_atomic
from kiln_device.contract import BAD_IMAGE, NO_SPACE, SLOT_LAYER_LIST, WRITE_FAILED
from kiln_device.errors import AgentError, log
from kiln_device.oci_layout import blob_path, layout_manifest
from kiln_device.tools import run

LAYERS_FILE = SLOT_LAYER_LIST.lstrip("/")  # at the top of a slot's manifest filesystem, and so of the booted root
OPAQUE_XATTR = "trusted.overlay.opaque"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
HEX64 = re.compile(r"[0-9a-f]{64}")
FULL_BELOW = 4 * 2**20  # a short write with less free than this is a full filesystem


@dataclass(frozen=True)
class Layer:
    """One layer of an image: its diff id (sha256 of the uncompressed tar, hex) and its erofs's
    fs-verity digest (`sha256:<hex>`)."""

    diff_id: str
    verity: str

    def line(self) -> str:
        return f"{self.diff_id} {self.verity}\n"


def image_layers(layout: Path, ref: str) -> list[tuple[str, Path]]:
    """(diff id hex, blob path) of each layer of `ref`, bottom first, from its verified config."""
    manifest = layout_manifest(layout, ref)
    config = read_json(blob_path(layout, manifest["config"]["digest"]))
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    blobs = [layer["digest"] for layer in manifest.get("layers", [])]
    if not blobs or len(diff_ids) != len(blobs):
        raise AgentError(BAD_IMAGE, f"the image {ref} names {len(blobs)} layers and {len(diff_ids)} diff ids")
    out = []
    for diff_id, digest in zip(diff_ids, blobs, strict=True):
        algo, _, hexd = str(diff_id).partition(":")
        if algo != "sha256" or not HEX64.fullmatch(hexd):
            raise AgentError(BAD_IMAGE, f"the image {ref} has a bad diff id {str(diff_id)[:80]!r}")
        out.append((hexd, blob_path(layout, digest)))
    return out


def measure(path: Path, *, compute: bool = True) -> tuple[str, bool]:
    """The file's fs-verity digest and whether the kernel checks it: the kernel's digest
    (`fsverity measure`) where verity is on, else computed from the content (`fsverity digest`):
    the same value either way. With compute=False, ("", False) instead of reading the file."""
    enabled = True
    try:
        out = run(["fsverity", "measure", str(path)], what=f"measuring {path.name}", code=WRITE_FAILED)
    except AgentError:  # verity off for the file, or no fs-verity here: whatever the message says
        if not compute:
            return "", False
        enabled = False
        out = run(["fsverity", "digest", str(path)], what=f"hashing {path.name}", code=WRITE_FAILED)
    digest = out.split()[0] if out.split() else ""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise AgentError(WRITE_FAILED, f"fsverity said {out.strip()[:120]!r} for {path}")
    return digest, enabled


def enable_verity(path: Path) -> bool:
    """Turn fs-verity on for a finished layer: the kernel then checks every block read from it
    against the digest. False where the filesystem or kernel has no fs-verity (a build host)."""
    done = subprocess.run(["fsverity", "enable", str(path)], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return True
    if "no space" in done.stderr.lower():
        raise AgentError(NO_SPACE, f"enabling fs-verity on {path}: {done.stderr.strip()}")
    return False


def ensure_layer(store: Path, diff_id: str, blob: Path, compressor: str | None, work: Path,
                 timeouts: tuple[float, float]) -> tuple[Layer, bool]:
    """The layer's erofs in the store, built from its blob unless a good one is there; (layer, built)."""
    final, expected = store / f"{diff_id}.erofs", store / f"{diff_id}.verity"
    if final.is_file() and expected.is_file():
        digest, _ = measure(final, compute=False)  # the kernel's digest where verity is on: nothing read
        if not digest:  # a layer the factory disk brought: verity turned on first, so the file is read once
            enable_verity(final)
            digest, _ = measure(final)  # the kernel's digest now, or computed where there is no fs-verity
        recorded = expected.read_text(errors="replace").strip()
        if digest == recorded:
            return Layer(diff_id, digest), False
        log(f"layer {diff_id[:12]} in {store} measures {digest[:19]}, not {recorded[:19]!r}: building it again")
    # The old file (if any) stays until the new one replaces it by rename: a power cut meanwhile
    # leaves what was there.
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    store.chmod(0o700)
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    work.chmod(0o700)  # the layer's setuid files and device nodes, on a partition without nosuid,nodev
    tree = work / "layer"
    remove_tree(tree)
    tree.mkdir()
    tree.chmod(0o755)  # the layer's own / (tar sets it when the layer has an entry for it)
    try:
        extract(blob, diff_id, tree, timeouts[0])
        tmp = store / f"{diff_id}.tmp"
        tmp.unlink(missing_ok=True)
        # Same layer, same bytes, on every device and in every factory disk: times and the UUID fixed.
        uuid = f"{diff_id[:8]}-{diff_id[8:12]}-{diff_id[12:16]}-{diff_id[16:20]}-{diff_id[20:32]}"
        argv = ["mkfs.erofs", "--quiet", "-T0", f"-U{uuid}", *([f"-z{compressor}"] if compressor else []),
                str(tmp), str(tree)]
        run(argv, what=f"building layer {diff_id[:12]}", code=WRITE_FAILED, timeout=timeouts[1], timeout_key="build")
    finally:
        remove_tree(tree)
    fsync_file(tmp)
    enable_verity(tmp)
    digest, _ = measure(tmp)
    expected.unlink(missing_ok=True)  # a layer file never goes without its recorded digest beside it
    os.rename(tmp, final)
    write_atomic(expected, f"{digest}\n".encode())
    fsync_dir(store)
    return Layer(diff_id, digest), True


def fill_store(store: Path, layers: Sequence[tuple[str, Path]], compressor: str | None,
               timeouts: tuple[float, float]) -> tuple[list[Layer], int, int]:
    """Every layer (diff id, blob) in the store: the missing ones built, the others reused.
    Returns the layers, how many were built and the bytes their files take."""
    work = store / ".work"
    out, built, written = [], 0, 0
    for diff_id, blob in layers:
        layer, made = ensure_layer(store, diff_id, blob, compressor, work, timeouts)
        out.append(layer)
        if made:
            built += 1
            written += (store / f"{diff_id}.erofs").stat().st_size
    remove_tree(work)
    return out, built, written


def extract(blob: Path, diff_id: str, tree: Path, timeout: float) -> None:
    """Unpack one layer blob into `tree` with GNU tar (owners, modes, xattrs, device nodes), checking
    that the uncompressed stream hashes to its diff id; then turn OCI whiteouts into overlayfs ones."""
    argv = ["tar", "--extract", "--file=-", "--numeric-owner", "--same-owner", "--same-permissions",
            "--xattrs", "--xattrs-include=*", "--xattrs-exclude=trusted.overlay.*", "-C", str(tree)]
    digest = hashlib.sha256()
    deadline = time.monotonic() + timeout
    with open(blob, "rb") as raw, tempfile.TemporaryFile() as errors:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(ZSTD_MAGIC):
            raise AgentError(BAD_IMAGE, f"layer {diff_id[:12]} is zstd-compressed; this agent reads gzip "
                                        "and plain tar layers")
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if magic.startswith(GZIP_MAGIC) else raw  # type: ignore[assignment]
        log("+ " + " ".join(argv))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        assert proc.stdin is not None
        try:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                proc.stdin.write(chunk)
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(argv, timeout)
            proc.stdin.close()
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except BrokenPipeError:  # tar stopped early: its message says why
            proc.wait()
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AgentError(WRITE_FAILED, f"unpacking layer {diff_id[:12]}: tar timed out after {timeout:g} s "
                                           "(timeouts.unpack in the agent config)") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            proc.kill()
            proc.wait()
            raise AgentError(BAD_IMAGE, f"layer {diff_id[:12]}: {exc}") from None
        errors.seek(0)
        text = errors.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        # GNU tar says "Wrote only N of M bytes" for a short write on a full filesystem, not ENOSPC.
        full = "no space left" in text.lower() or ("wrote only" in text.lower() and
                                                   shutil.disk_usage(tree).free < FULL_BELOW)
        code = NO_SPACE if full else WRITE_FAILED
        raise AgentError(code, f"unpacking layer {diff_id[:12]}: tar: {text[-400:]}")
    if digest.hexdigest() != diff_id:
        raise AgentError(BAD_IMAGE, f"layer {diff_id[:12]} unpacks to sha256:{digest.hexdigest()[:12]}, "
                                    "not its diff id: the image is corrupt")
    convert_whiteouts(tree)


def convert_whiteouts(tree: Path) -> int:
    """OCI whiteouts to overlayfs ones: `.wh.NAME` becomes a 0/0 character device NAME, and
    `.wh..wh..opq` marks its directory opaque (trusted.overlay.opaque=y). Returns how many."""
    count = 0
    for top, dirs, files in os.walk(tree):
        here = Path(top)
        for name in [*files, *dirs]:
            if not name.startswith(WHITEOUT):
                continue
            marker = here / name
            if name == OPAQUE:
                marker.unlink()
                os.setxattr(here, OPAQUE_XATTR, b"y")
            else:
                hidden = here / name[len(WHITEOUT):]
                if hidden.name in ("", ".", ".."):
                    raise AgentError(BAD_IMAGE, f"layer whiteout {marker.relative_to(tree)} names nothing")
                if stat.S_ISDIR(marker.lstat().st_mode):
                    raise AgentError(BAD_IMAGE, f"layer whiteout {marker.relative_to(tree)} is a directory")
                marker.unlink()
                if not os.path.lexists(hidden):
                    os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0))
                elif hidden.is_dir() and not hidden.is_symlink():
                    # OCI: a whiteout hides lower layers only; this layer's own directory of that
                    # name replaces the lower one whole
                    os.setxattr(hidden, OPAQUE_XATTR, b"y")
            count += 1
        dirs[:] = [d for d in dirs if not d.startswith(WHITEOUT)]
    return count


def remove_tree(tree: Path) -> None:
    """rmtree that never crosses into a mount (a layer left mounted by a killed run)."""
    if tree.exists():
        release_mounts(tree)
        shutil.rmtree(tree, ignore_errors=True)


def mounts_under(top: Path) -> list[Path]:
    """Mount points at or below `top`, deepest first (from /proc/self/mountinfo)."""
    found = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    prefix = str(top.resolve()) if top.exists() else str(top)
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def release_mounts(top: Path) -> None:
    for point in mounts_under(top):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


@contextlib.contextmanager
def mounted_stack(store: Path, layers: Sequence[Layer], mnt: Path) -> Iterator[Path]:
    """The image's root as the device will boot it: each layer's erofs mounted read-only (loop),
    stacked by overlayfs (top layer first). Yields the merged root; unmounts everything after."""
    release_mounts(mnt)
    shutil.rmtree(mnt, ignore_errors=True)
    mnt.mkdir(parents=True)
    points: list[Path] = []
    try:
        for i, layer in enumerate(layers):
            point = mnt / f"{i}"
            point.mkdir()
            run(["mount", "-t", "erofs", "-o", "ro,loop", str(store / f"{layer.diff_id}.erofs"), str(point)],
                what=f"mounting layer {layer.diff_id[:12]}", code=WRITE_FAILED)
            points.append(point)
        if len(points) == 1:
            yield points[0]
            return
        root = mnt / "root"
        root.mkdir()
        lower = ":".join(str(p) for p in reversed(points))
        run(["mount", "-t", "overlay", "-o", f"ro,lowerdir={lower}", "kiln-update", str(root)],
            what="stacking the layers", code=WRITE_FAILED)
        yield root
    finally:
        release_mounts(mnt)
        shutil.rmtree(mnt, ignore_errors=True)


def drop_partial_layers(store: Path) -> None:
    """Out of space: the layer being built goes (its work tree and temporary file); finished layers stay."""
    remove_tree(store / ".work")
    for tmp in store.glob("*.tmp") if store.is_dir() else []:
        with contextlib.suppress(OSError):
            tmp.unlink()


def manifest_text(layers: Iterable[Layer]) -> str:
    return "".join(layer.line() for layer in layers)


def parse_manifest(text: str) -> list[str]:
    """The diff ids a `/kiln-layers` file names (lines that do not parse are skipped)."""
    ids = []
    for line in text.splitlines():
        parts = line.split()
        if parts and HEX64.fullmatch(parts[0]):
            ids.append(parts[0])
    return ids


def gc_store(store: Path, keep: Iterable[str]) -> int:
    """Remove layers (and leftovers) no slot needs; returns the bytes freed."""
    live = set(keep)
    freed = 0
    for path in store.iterdir() if store.is_dir() else []:
        if path.name.startswith("."):  # the work directory
            continue
        stem = path.name.split(".", 1)[0]
        if stem in live and path.suffix in (".erofs", ".verity"):
            continue
        with contextlib.suppress(OSError):
            freed += path.stat().st_size
            path.unlink()
    return freed
