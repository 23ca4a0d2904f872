"""A disk for an image with verified boot (its boot layer, builder.image.boot): what differs from a plain one.

- The ESP holds the image's signed systemd-boot and slot A's signed UKI as a type #2 entry
  (EFI/Linux/kiln-<version>-a.efi), no kernel, initramfs or .conf entry.
- root-a holds the slot's layer list alone (/kiln-layers), as the agent writes a slot made of
  layers; its sha256 must be the digest slot A's UKI binds, checked here before anything is written.
- `<disk>.efivars.fd` beside the disk: OVMF's variables with the image's PK, KEK and db enrolled and
  Secure Boot on, which `kiln vm run` boots the disk with (the firmware a factory would provision).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from builder.core.errors import CommandFailed, DiskError
from builder.core.run import run
from builder.core.safe import format_size
from builder.disk.unpacked import BootFiles
from builder.spec.schema import Architecture
from kiln_device import contract
from kiln_device.layers import LAYERS_FILE, Layer, manifest_text

ROOT_A = contract.slot_label("a")


def efivars_path(disk: Path) -> Path:
    """`<disk>.efivars.fd`: the firmware variable store a verified disk boots with (`kiln vm run`)."""
    return disk.with_name(disk.name + ".efivars.fd")


def make_layer_list_root(want: str, layers: Sequence[Layer], out: Path, tree: Path, *, fs_uuid: str) -> None:
    """Slot A as the agent writes a slot made of layers: a small erofs holding /kiln-layers alone. Its
    digest must be the one slot A's UKI binds, or the disk would never boot."""
    text = manifest_text(layers)
    got = contract.layers_digest(text)
    if got != want:
        raise DiskError(f"the layers made here list to {got}, but the image's UKIs bind {want}: this machine's "
                        "mkfs.erofs or tar makes other bytes than the build's; nothing was written")
    tree.mkdir()
    (tree / LAYERS_FILE).write_text(text)
    for p in (tree, tree / LAYERS_FILE):
        os.utime(p, (0, 0))
    try:
        run(["mkfs.erofs", "--quiet", "-T0", f"-U{fs_uuid}", out, tree])
    except CommandFailed as exc:
        raise DiskError(f"writing {ROOT_A}: {exc}") from exc


def make_disk_efivars(arch: Architecture, boot: BootFiles, out: Path) -> Path:
    """OVMF variables with the image's PK, KEK and db certificates enrolled and Secure Boot on."""
    from builder.keys.secureboot import BLANK_VARS, SecureBootKeys, make_enrolled_vars

    blank = BLANK_VARS.get(arch.value)
    if blank is None or not blank.is_file():
        raise DiskError(f"no blank UEFI variable store for {arch.value} here ({blank})",
                        hint="apt-get install ovmf")
    staged = out.with_name("sb-certs")
    staged.mkdir(mode=0o700)
    for name in ("PK.crt", "KEK.crt", "db.crt", "owner-guid"):
        shutil.copyfile(boot.certs / name, staged / name)
    return make_enrolled_vars(SecureBootKeys(staged), blank, out)


def stage_verified_esp(boot: BootFiles, tree: Path, *, arch: Architecture, entry_name: str, loader_conf: str,
                       esp_size: int, class_name: str) -> None:
    """Stage the ESP's files in `tree`: the signed systemd-boot, loader.conf and slot A's signed UKI (a
    type #2 entry, blessed); refuse an ESP too small for the UKIs an update adds."""
    stage = {f"EFI/BOOT/{arch.efi_boot_file}": boot.loader, f"EFI/systemd/{boot.loader.name}": boot.loader,
             f"{contract.UKI_DIR}/{entry_name}": boot.ukis["a"]}
    for rel, src in stage.items():
        dest = tree / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    (tree / "loader").mkdir(parents=True)
    (tree / "loader/loader.conf").write_text(loader_conf)
    payload = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    # An update writes slot B's UKI beside slot A's, and a third while one is replaced.
    needed = payload + 2 * boot.uki_size()
    if needed > esp_size * 0.9:
        raise DiskError(f"the ESP is too small: slot A's and B's UKIs and one more while an update writes need "
                        f"{format_size(needed)} but spec.disk.esp of {class_name} is {format_size(esp_size)}",
                        hint="raise spec.disk.esp")
