"""The one kernel finder: which kernel an image boots, and whether the boot loader can start it.

    kernels = find_kernels(tree)          # every /usr/lib/modules/<kver> with vmlinuz + initramfs.img
    boot = kernels[-1]                    # the newest (kernel version order): what a slot boots
    why = why_not_bootable(boot.vmlinuz)  # None, or why systemd-boot cannot start it

The build (`kiln disk`, builder.disk.unpacked), the image lints (kiln_device.lint) and the agent writing a
slot (kiln_device.agent.slot) all use this module, on x86_64 and arm64 alike. A Kiln image keeps
its kernel bootc's way, in /usr/lib/modules/$kver/vmlinuz beside initramfs.img, with /boot empty.
The kernel must be an EFI image (PE, `MZ`): systemd-boot starts nothing else. Debian's arm64
vmlinuz is gzip (systemd #23788), so the build stores it uncompressed (builder.base.bootstrap, the apt
template); a gzip kernel that reaches a slot is refused here, never written to the ESP.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kiln_device.contract import MODULES_DIR
from kiln_device.tree import resolve_in_tree

VMLINUZ = "vmlinuz"
INITRD = "initramfs.img"
PE_MAGIC = b"MZ"
# A compressed kernel (no EFI stub outside it): what arm64 distributions ship as vmlinuz.
COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2",
              b"\x02\x21\x4c\x18": "lz4"}


@dataclass(frozen=True)
class Kernel:
    version: str  # the kernel release: 6.1.0-41-arm64
    vmlinuz: Path
    initrd: Path


def version_key(text: str) -> list[tuple[int, str]]:
    """Kernel releases in version order (6.1.0-9 before 6.1.0-10), not string order."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", text)]


def kernel_dirs(tree: Path) -> list[Path]:
    """Every directory under /usr/lib/modules, in version order (with or without a kernel in it)."""
    modules = resolve_in_tree(tree, MODULES_DIR)
    if not modules.is_dir():
        return []
    return sorted((modules / name for name in os.listdir(modules) if (modules / name).is_dir()),
                  key=lambda p: version_key(p.name))


def find_kernels(tree: Path) -> list[Kernel]:
    """Each kernel of the image that has both vmlinuz and initramfs.img, oldest first, each resolved
    inside the tree (a link to /etc/hostname is the image's /etc/hostname, never this machine's)."""
    found = []
    for kdir in kernel_dirs(tree):
        kernel = resolve_in_tree(tree, f"{MODULES_DIR}/{kdir.name}/{VMLINUZ}")
        initrd = resolve_in_tree(tree, f"{MODULES_DIR}/{kdir.name}/{INITRD}")
        if kernel.exists() and initrd.exists():
            found.append(Kernel(kdir.name, kernel, initrd))
    return found


def kernel_format(path: Path) -> str:
    """`efi` (a PE image systemd-boot can start), a compressor's name (`gzip`: it cannot), or `unknown`."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PE_MAGIC):
        return "efi"
    for magic, name in COMPRESSED.items():
        if head.startswith(magic):
            return name
    return "unknown"


def why_not_bootable(path: Path) -> str | None:
    """Why systemd-boot cannot start this vmlinuz: it is compressed (None: it is not; an EFI image, or
    bytes this check does not know, which it leaves to the boot itself)."""
    fmt = kernel_format(path)
    if fmt in COMPRESSED.values():
        return (f"is {fmt}-compressed: systemd-boot cannot start it (systemd #23788); "
                "the image must keep it uncompressed (Kiln's bases and apt template do)")
    return None
