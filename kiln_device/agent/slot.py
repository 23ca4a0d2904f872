"""The new root filesystem: unpack the verified image, check it against its labels, build
the erofs image, write it onto the inactive slot."""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from kiln_device.agent.config import Config, load_release
from kiln_device.agent.journal import FAULT_ENV, fault_point
from kiln_device.agent.versions import Candidate
from kiln_device.common import CHUNK, sha256_file
from kiln_device.contract import (
    BAD_IMAGE,
    EROFS_COMPRESSORS,
    MODULES_DIR,
    NO_SPACE,
    RELEASE_JSON,
    WRITE_FAILED,
    Release,
    bad_kernel_args,
)
from kiln_device.errors import AgentError
from kiln_device.kernel import find_kernels, why_not_bootable
from kiln_device.tools import run
from kiln_device.tree import resolve_in_tree

EROFS_MAGIC = 0xE0F5E1E2


@dataclass(frozen=True)
class Paths:
    layout: Path
    tree: Path
    image: Path


def work_paths(config: Config) -> Paths:
    return Paths(layout=config.oci_dir, tree=config.work_dir / "rootfs", image=config.work_dir / "root.erofs")


@dataclass(frozen=True)
class NewRoot:
    """What the unpacked image brings for its slot: its release, kernel, initramfs, arguments, compressor."""

    release: Release
    kernel: Path
    initrd: Path
    kargs: tuple[str, ...]
    compressor: str | None  # mkfs.erofs -z argument; None: uncompressed


def unpack(layout: Path, ref: str, tree: Path, timeout: float | None = None) -> Path:
    """umoci raw unpack into `tree` (removed first); returns the rootfs. The work directory
    above it is made private (0700): the tree holds the image's setuid files and device nodes,
    and the data partition is not mounted nosuid,nodev."""
    if tree.exists():
        shutil.rmtree(tree)
    tree.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tree.parent.chmod(0o700)  # one made 0755 by an older agent or tmpfiles.d
    argv = ["umoci", "raw", "unpack", *([] if os.geteuid() == 0 else ["--rootless"]),
            "--image", f"{layout}:{ref}", str(tree)]
    run(argv, what=f"unpacking {ref}", code=WRITE_FAILED, timeout=timeout, timeout_key="unpack")
    return tree


def check_tree(tree: Path, cand: Candidate) -> NewRoot:
    """The unpacked image must agree with its labels; its release.json names everything else.
    Every refusal here is the image's fault (BAD_IMAGE): the agent runs this before it writes anything."""
    path = resolve_in_tree(tree, RELEASE_JSON)
    try:
        release = load_release(path)
    except AgentError as exc:
        raise AgentError(BAD_IMAGE, f"the image {cand.version}: {exc.message}") from None
    if release.compatible != cand.compatible or release.version != cand.version or \
            (cand.development is not None and release.development != cand.development):
        raise AgentError(BAD_IMAGE, f"the image's release.json ({release.compatible} {release.version}, development "
                                    f"{release.development}) does not match its labels ({cand.compatible} "
                                    f"{cand.version}, development {cand.development})")
    if release.kernel_args is None or release.compression is None:
        raise AgentError(BAD_IMAGE, f"{RELEASE_JSON} of {cand.version} has no kernelArgs or rootCompression "
                                    "(an image from an older Kiln); this agent cannot install it")
    bad = bad_kernel_args(release.kernel_args)
    if bad:
        raise AgentError(BAD_IMAGE, f"{RELEASE_JSON} of {cand.version} has bad kernelArgs: {'; '.join(bad[:3])}")
    kernels = find_kernels(tree)
    if not kernels:
        raise AgentError(BAD_IMAGE, f"the image has no {MODULES_DIR}/<kver>/vmlinuz + initramfs.img")
    boot = kernels[-1]
    kver, kernel, initrd = boot.version, boot.vmlinuz, boot.initrd
    for name, file in (("vmlinuz", kernel), ("initramfs.img", initrd)):
        if not stat.S_ISREG(file.lstat().st_mode):
            raise AgentError(BAD_IMAGE, f"{MODULES_DIR}/{kver}/{name} is not a regular file in the image "
                                        f"{cand.version} (its links resolved inside the image)")
    why = why_not_bootable(kernel)
    if why is not None:
        raise AgentError(BAD_IMAGE, f"{MODULES_DIR}/{kver}/vmlinuz of {cand.version} {why}")
    return NewRoot(release, kernel, initrd, release.kernel_args, EROFS_COMPRESSORS[release.compression])


def build_erofs(tree: Path, image: Path, compressor: str | None, timeout: float | None = None) -> str:
    image.unlink(missing_ok=True)
    argv = ["mkfs.erofs", "--quiet", "-T0", *([f"-z{compressor}"] if compressor else []), str(image), str(tree)]
    run(argv, what="building the root filesystem", code=WRITE_FAILED, timeout=timeout, timeout_key="build")
    return sha256_file(image)


def erofs_size(path: Path) -> int:
    """The size of the erofs filesystem at the start of `path` (from its superblock)."""
    with open(path, "rb") as f:
        f.seek(1024)
        sb = f.read(40)
    if len(sb) < 40 or int.from_bytes(sb[0:4], "little") != EROFS_MAGIC:
        raise AgentError(WRITE_FAILED, f"{path}: no erofs superblock")
    return int.from_bytes(sb[36:40], "little") << sb[12]


def device_size(path: Path) -> int | None:
    """The size of a block device, None for a regular file (a test's stand-in slot)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return None
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def write_slot(image: Path, device: Path) -> int:
    """Copy the erofs image onto the slot from offset 0, fsync. Never truncates a device."""
    size = image.stat().st_size
    limit = device_size(device) if device.exists() else None
    if limit is not None and size > limit:
        raise AgentError(NO_SPACE, f"the new root filesystem ({size} bytes) does not fit {device} ({limit} bytes)")
    flags = os.O_WRONLY | (0 if device.exists() else os.O_CREAT)
    out = os.open(device, flags, 0o600)
    try:
        written, half = 0, (size // 2 if os.environ.get(FAULT_ENV) == "stop:writing" else -1)
        with open(image, "rb") as fin:
            while chunk := fin.read(min(CHUNK, half - written) if written < half else CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                written += len(chunk)
                if written == half:  # the testing hook: the power goes out half way through
                    os.fdatasync(out)  # what the page cache had written back by then
                    fault_point("writing")
        os.fsync(out)
    finally:
        os.close(out)
    return size
