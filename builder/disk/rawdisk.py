"""A finished raw disk, read and edited without mounting it: copied sparse, its partition table, a factory reset.

    copy_sparse(image, disk, offset)          # a filesystem image into a partition; holes stay holes
    partition_offset(disk, "esp")             # where a partition starts, in bytes
    make_factory_reset(disk)                  # the next boot wipes the /etc and /var overlays
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from builder.core.errors import DiskError, KilnError
from builder.core.run import run
from kiln_device import contract

MiB = 1024**2
SECTOR = 512
# Touch this on the data partition and the initramfs wipes the overlays on the next boot.
FACTORY_RESET_FLAG = "factory-reset"


def copy_sparse(src: Path, dest: Path, offset: int, block: int = MiB) -> None:
    """Copy `src` into `dest` at `offset`, skipping holes and zero blocks (dest stays sparse)."""
    zero = bytes(block)
    with src.open("rb") as fin, dest.open("r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fin.fileno(), pos, os.SEEK_HOLE)
            fin.seek(pos)
            while pos < hole:
                chunk = fin.read(min(block, hole - pos))
                if chunk != zero[: len(chunk)]:
                    fout.seek(offset + pos)
                    fout.write(chunk)
                pos += len(chunk)



def read_partition_table(disk: Path) -> list[dict[str, Any]]:
    """sfdisk --json of a raw disk: the partitions with name, uuid, type, start and size (sectors)."""
    out = run(["sfdisk", "--json", disk], capture=True, quiet=True)
    table = json.loads(out.stdout)["partitiontable"]
    return list(table.get("partitions", []))


def partition_offset(disk: Path, label: str) -> int:
    for p in read_partition_table(disk):
        if p.get("name") == label:
            return int(p["start"]) * SECTOR
    raise DiskError(f"{disk} has no partition labelled {label!r}")


def make_factory_reset(disk: Path) -> None:
    """Flag the data partition of a powered-off raw disk: the initramfs wipes the overlays on the next boot.

    Writes the file `factory-reset` at the root of the data filesystem with debugfs
    (no mount); `kiln-overlay` in the initramfs removes overlay/*/{upper,work} and the flag.
    """
    offset = partition_offset(disk, contract.DATA_LABEL)
    try:
        run(["debugfs", "-w", "-R", f"write /dev/null {FACTORY_RESET_FLAG}", f"{disk}?offset={offset}"],
            capture=True)
    except KilnError as exc:
        raise DiskError(f"factory reset of {disk}: {exc}") from exc
