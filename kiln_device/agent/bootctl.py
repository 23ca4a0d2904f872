"""Boot control: what the agent needs from the boot loader, one backend per kind.

Entry names and text are the contract's (kiln_device.contract), shared with `kiln disk`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from kiln_device.agent.config import Config
from kiln_device.common import copy_atomic, fsync_dir, sha256_file, write_atomic
from kiln_device.contract import (
    CONFIG,
    WRITE_FAILED,
    Entry,
    entry_name,
    esp_kernel_dir,
    parse_entry_name,
    read_cmdline_slot,
    render_entry,
)
from kiln_device.errors import AgentError

EFI_LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"  # systemd-boot's LoaderEntrySelected vendor


class BootControl:
    """What the agent needs from the boot loader. One backend per boot-control kind."""

    name = "abstract"

    def booted_slot(self) -> str | None:
        raise NotImplementedError

    def selected_entry(self) -> str | None:
        raise NotImplementedError

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def remove_slot_entries(self, slot: str) -> list[str]:
        raise NotImplementedError

    def install_kernel(self, slot: str, kernel: Path, initrd: Path) -> dict[str, str]:
        raise NotImplementedError

    def add_trial_entry(self, *, cls: str, version: str, slot: str, tries: int, kargs: Sequence[str]) -> str:
        raise NotImplementedError

    def entry_complete(self, name: str) -> bool:
        """Whether an entry was written in full (a power cut may leave a renamed, empty file)."""
        return True


class SystemdBoot(BootControl):
    """systemd-boot with Automatic Boot Assessment: BLS entries on the ESP, `+N` counters.

    The loader picks `default kiln-*` by version; a trial entry (`+N`) is tried N
    times, systemd-bless-boot renames it to `kiln-<v>-<slot>.conf` once
    boot-complete.target is reached, and an exhausted one sorts last so the old
    entry boots again. Never pins `default` (a pinned trial entry boots forever)."""

    name = "systemd-boot"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.entries_dir = config.esp / "loader" / "entries"

    def booted_slot(self) -> str | None:
        try:
            return read_cmdline_slot(self.config.cmdline.read_text())
        except OSError:
            return None

    def selected_entry(self) -> str | None:
        path = self.config.efivars / f"LoaderEntrySelected-{EFI_LOADER_GUID}"
        try:
            raw = path.read_bytes()[4:]  # 4 bytes of attributes, then UTF-16LE, NUL-terminated
        except OSError:
            return None
        return raw.decode("utf-16-le", errors="replace").rstrip("\0") or None

    def entries(self) -> list[Entry]:
        if not self.entries_dir.is_dir():
            return []
        found = [parse_entry_name(p.name) for p in sorted(self.entries_dir.iterdir())]
        return [e for e in found if e is not None]

    def remove_slot_entries(self, slot: str) -> list[str]:
        removed = []
        for entry in self.entries():
            if entry.slot == slot:
                (self.entries_dir / entry.name).unlink()
                removed.append(entry.name)
        if removed:
            fsync_dir(self.entries_dir)
        return removed

    def install_kernel(self, slot: str, kernel: Path, initrd: Path) -> dict[str, str]:
        dest = self.config.esp / esp_kernel_dir(slot).lstrip("/")
        hashes = {}
        for name, src in (("vmlinuz", kernel), ("initramfs.img", initrd)):
            # The same kernel or initramfs already there (the slot's last release had it) is kept, not
            # written again: the ESP is FAT, and most updates do not change them. Read back past the
            # page cache either way, so what is kept is what was checked.
            wanted = sha256_file(src)
            with contextlib.suppress(OSError):
                if sha256_file(dest / name) == wanted:
                    hashes[name] = wanted
                    continue
            hashes[name] = copy_atomic(src, dest / name)
            if sha256_file(dest / name) != hashes[name]:
                raise AgentError(WRITE_FAILED, f"{dest / name} reads back different bytes than were written")
        return hashes

    def add_trial_entry(self, *, cls: str, version: str, slot: str, tries: int, kargs: Sequence[str]) -> str:
        name = entry_name(version, slot, tries)
        text = render_entry(cls=cls, version=version, slot=slot, partuuid=self.partuuid(slot), kargs=kargs)
        write_atomic(self.entries_dir / name, text.encode())
        return name

    def entry_complete(self, name: str) -> bool:
        try:
            text = (self.entries_dir / name).read_text()
        except (OSError, UnicodeDecodeError):
            return False
        return text.endswith("\n") and "\noptions " in text

    def partuuid(self, slot: str) -> str:
        if slot in self.config.partuuids:
            return self.config.partuuids[slot]
        target = os.path.realpath(self.config.slots[slot])
        by_uuid = Path("/dev/disk/by-partuuid")
        for link in sorted(by_uuid.iterdir()) if by_uuid.is_dir() else []:
            if os.path.realpath(link) == target:
                return link.name
        raise AgentError(CONFIG, f"no PARTUUID found for slot {slot} ({self.config.slots[slot]}); "
                                 "set partuuids in the agent config")


class NvBootCtrl(BootControl):
    """NVIDIA Jetson A/B (nvbootctrl / UEFI capsule). Not implemented: it raises, by design."""

    name = "nvbootctrl"

    def __init__(self, config: Config) -> None:
        raise NotImplementedError("the Jetson nvbootctrl boot-control backend is not implemented yet; "
                                  "this device cannot be updated by kiln-agent")


def make_boot_control(config: Config, kind: str) -> BootControl:
    if kind == "systemd-boot":
        return SystemdBoot(config)
    if kind == "nvbootctrl":
        return NvBootCtrl(config)
    raise AgentError(CONFIG, f"unknown boot control {kind!r}")
