"""What an unpacked Kiln image brings to its disk: release.json, class.json, the kernel, its arguments.

    info = read_image_info(rootfs, "localhost/kiln/qemu-x86_64:1.0.0")
    info.class_name, info.version, info.kernel, info.initrd, info.kargs, info.disk
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core import safe
from builder.core.errors import DiskError
from builder.spec.schema import Architecture, Disk
from kiln_device import contract, kernel

RELEASE_JSON = contract.RELEASE_JSON.lstrip("/")
CLASS_JSON = contract.CLASS_JSON.lstrip("/")
KARGS_DIR = contract.KARGS_DIR.lstrip("/")
MODULES_DIR = contract.MODULES_DIR.lstrip("/")


@dataclass(frozen=True)
class ImageInfo:
    """What `kiln disk` needs from an unpacked image (read by `read_image_info`)."""

    source: str
    class_name: str
    version: str
    architecture: Architecture
    kernel_version: str
    kernel: Path  # inside the rootfs
    initrd: Path
    kargs: tuple[str, ...]
    disk: Disk
    storage: int | None  # spec.envelope.storage: the device's whole disk
    development: bool = False
    boot: BootFiles | None = None  # verified boot: the image's signed UKIs (builder.image.boot)


@dataclass(frozen=True)
class BootFiles:
    """What the boot layer of an image with verified boot brings (contract.BOOT_DIR)."""

    ukis: dict[str, Path]  # slot -> the signed UKI
    loader: Path  # signed systemd-boot
    certs: Path  # PK.crt, KEK.crt, db.crt, owner-guid
    layers: str  # the layer list digest the UKIs' command lines bind

    def uki_size(self) -> int:
        return max(p.stat().st_size for p in self.ukis.values())


def read_boot_files(rootfs: Path, source: str, arch: Architecture) -> BootFiles | None:
    """The boot layer's files, None for an image without verified boot. Each UKI must bind the same list."""
    from kiln_device.pe import PEError, text_section

    boot = rootfs / contract.BOOT_DIR.lstrip("/")
    if not boot.is_dir():
        return None
    ukis = {slot: boot / contract.uki_image_name(slot) for slot in contract.SLOTS}
    loader = boot / f"systemd-boot{arch.efi_boot_file.removeprefix('BOOT').lower()}"
    certs = boot / "secureboot"
    for path in [*ukis.values(), loader, certs / "PK.crt", certs / "KEK.crt", certs / "db.crt", certs / "owner-guid"]:
        if not path.is_file():
            raise DiskError(f"{source}: the boot layer has no /{path.relative_to(rootfs)}")
    digests = set()
    for slot, uki in ukis.items():
        try:
            cmdline = text_section(uki, ".cmdline") or ""
        except PEError as exc:
            raise DiskError(f"{source}: {exc}") from None
        if contract.read_cmdline_slot(cmdline) != slot:
            raise DiskError(f"{source}: /{uki.relative_to(rootfs)} does not boot slot {slot} ({cmdline[:120]!r})")
        digests.add(contract.read_cmdline_value(cmdline, contract.LAYERS_KARG))
    if len(digests) != 1 or None in digests:
        raise DiskError(f"{source}: the UKIs bind {len(digests)} different layer lists ({sorted(map(str, digests))})")
    return BootFiles(ukis, loader, certs, str(digests.pop()))


def read_image_info(rootfs: Path, source: str, *, version: str | None = None) -> ImageInfo:
    """Read release.json, class.json, the kernel arguments and the kernel of an unpacked image."""
    try:
        release = contract.parse_release(_read_json(rootfs, RELEASE_JSON, source), f"/{RELEASE_JSON}")
    except contract.ContractError as exc:
        raise DiskError(f"{source}: {exc}") from None
    klass = _read_json(rootfs, CLASS_JSON, source)
    spec = klass.get("spec") or {}
    try:
        disk = Disk.model_validate(spec.get("disk") or {})
        arch = Architecture(spec.get("architecture", "x86_64"))
    except ValueError as exc:
        raise DiskError(f"{source}: /{CLASS_JSON} has no valid spec.disk: {exc}") from None
    kver, kernel, initrd = find_kernel(rootfs, source)
    storage = (spec.get("envelope") or {}).get("storage")
    class_name, image_version = release.cls, release.version
    # Both name files under build/ and the disk's identifiers: an image must not steer them outside.
    for what, value, check in (("class", class_name, safe.name), ("version", image_version, safe.version)):
        try:
            check(value)
        except ValueError as exc:
            raise DiskError(f"{source}: /{RELEASE_JSON}: {what}: {exc}") from None
    return ImageInfo(
        source=source,
        class_name=class_name,
        version=version or image_version,
        architecture=arch,
        kernel_version=kver,
        kernel=kernel,
        initrd=initrd,
        kargs=finalize_kargs(release, rootfs),
        disk=disk,
        storage=int(storage) if storage is not None else None,
        development=bool(spec.get("development", False)),
        boot=read_boot_files(rootfs, source, arch),
    )


def _read_json(rootfs: Path, rel: str, source: str) -> dict[str, Any]:
    path = rootfs / rel
    rel = "/" + rel
    if not path.is_file():
        raise DiskError(f"{source} is not a Kiln image: {rel} is missing",
                        hint="build it with `kiln build CLASS` (it bakes release.json and class.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DiskError(f"{source}: cannot read {rel}: {exc}") from None
    if not isinstance(data, dict):
        raise DiskError(f"{source}: {rel} is not a JSON object")
    return data


def find_kernel(rootfs: Path, source: str) -> tuple[str, Path, Path]:
    """The kernel the image boots (kiln_device.kernel: the newest with vmlinuz and initramfs.img),
    checked to be one systemd-boot can start."""
    found = kernel.find_kernels(rootfs)
    with_vmlinuz = [d.name for d in kernel.kernel_dirs(rootfs) if (d / kernel.VMLINUZ).exists()]
    if not with_vmlinuz:
        raise DiskError(f"{source} has no kernel: no /{MODULES_DIR}/<kver>/vmlinuz",
                        hint="a Kiln image keeps its kernel in /usr/lib/modules/$kver/vmlinuz "
                             "(the class's kernel.package, moved there by the Containerfile)")
    if not found or found[-1].version != with_vmlinuz[-1]:  # the newest kernel must be whole
        raise DiskError(f"{source} has a kernel but no initramfs: /{MODULES_DIR}/{with_vmlinuz[-1]}/initramfs.img "
                        "is missing", hint="the image must run update-initramfs with Kiln's hook (overlays/initramfs)")
    boot = found[-1]
    why = kernel.why_not_bootable(boot.vmlinuz)
    if why is not None:
        raise DiskError(f"{source}: /{MODULES_DIR}/{boot.version}/vmlinuz {why}")
    return boot.version, boot.vmlinuz, boot.initrd


def finalize_kargs(release: contract.Release, rootfs: Path) -> tuple[str, ...]:
    """release.json's kernelArgs (what the agent uses for the other slot), else kargs.d (older images)."""
    return release.kernel_args if release.kernel_args is not None else read_kargs(rootfs)


def read_kargs(rootfs: Path) -> tuple[str, ...]:
    """Kernel arguments from /usr/lib/bootc/kargs.d/*.toml, in file-name order (bootc's rule)."""
    args: list[str] = []
    for path in sorted((rootfs / KARGS_DIR).glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise DiskError(f"/{KARGS_DIR}/{path.name}: {exc}") from None
        kargs = data.get("kargs", [])
        if not isinstance(kargs, list) or not all(isinstance(a, str) for a in kargs):
            raise DiskError(f"/{KARGS_DIR}/{path.name}: kargs must be a list of strings")
        args.extend(kargs)
    return tuple(args)
