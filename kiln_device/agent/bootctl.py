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
    UKI_DIR,
    WRITE_FAILED,
    Entry,
    entry_name,
    esp_kernel_dir,
    parse_entry_name,
    read_cmdline_slot,
    render_entry,
)
from kiln_device.errors import AgentError
from kiln_device.pe import PEError, read_headers

EFI_LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"  # systemd-boot's LoaderEntrySelected vendor
EFI_GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"  # the UEFI spec's SecureBoot, SetupMode


def secure_boot_state(efivars: Path) -> str | None:
    """What the firmware says: "enabled" (SecureBoot 1: signatures enforced), "setup" (no PK enrolled: nothing
    is enforced), "disabled"; None where there are no EFI variables to read."""
    def flag(name: str) -> int | None:
        try:
            raw = (efivars / f"{name}-{EFI_GLOBAL_GUID}").read_bytes()
        except OSError:
            return None
        return raw[4] if len(raw) > 4 else None  # 4 bytes of attributes, then one byte

    secure = flag("SecureBoot")
    if secure is None:
        return None
    if secure == 1:
        return "enabled"
    return "setup" if flag("SetupMode") == 1 else "disabled"


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

    def stage_uki(self, slot: str, uki: Path) -> str:
        raise NotImplementedError

    def add_trial_uki(self, *, version: str, slot: str, tries: int) -> str:
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
        self.uki_dir = config.esp / UKI_DIR  # type #2 entries: the UKIs of a device with verified boot

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
        """Type #1 entries (loader/entries/*.conf) and type #2 (EFI/Linux/*.efi), each only in its own place."""
        found = []
        for folder, kind in ((self.entries_dir, False), (self.uki_dir, True)):
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                entry = parse_entry_name(path.name)
                if entry is not None and entry.uki == kind:
                    found.append(entry)
        return found

    def entry_path(self, entry: Entry) -> Path:
        return (self.uki_dir if entry.uki else self.entries_dir) / entry.name

    def remove_slot_entries(self, slot: str) -> list[str]:
        removed = []
        for entry in self.entries():
            if entry.slot == slot:
                self.entry_path(entry).unlink()
                removed.append(entry.name)
        if removed:
            fsync_dir(self.entries_dir if self.entries_dir.is_dir() else self.uki_dir)
            if self.uki_dir.is_dir():
                fsync_dir(self.uki_dir)
        return removed

    def staged_uki(self, slot: str) -> Path:
        """Where a slot's new UKI waits for its trial entry: in EFI/Linux, but not named *.efi, so the
        loader never lists it."""
        return self.uki_dir / f"kiln-{slot}.staged"

    def stage_uki(self, slot: str, uki: Path) -> str:
        """Copy the slot's signed UKI to the ESP (read back); the trial entry is its rename."""
        wanted = sha256_file(uki)
        dest = self.staged_uki(slot)
        with contextlib.suppress(OSError):
            if sha256_file(dest) == wanted:
                return wanted
        written = copy_atomic(uki, dest)
        if written != wanted or sha256_file(dest) != wanted:
            raise AgentError(WRITE_FAILED, f"{dest} reads back different bytes than were written")
        return wanted

    def add_trial_uki(self, *, version: str, slot: str, tries: int) -> str:
        """The staged UKI renamed to its counted name `kiln-<version>-<slot>+N.efi`: from now on it boots."""
        name = entry_name(version, slot, tries, uki=True)
        staged = self.staged_uki(slot)
        if not staged.is_file():
            raise AgentError(WRITE_FAILED, f"slot {slot}'s UKI is not staged at {staged}")
        os.replace(staged, self.uki_dir / name)
        fsync_dir(self.uki_dir)
        return name

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
        entry = parse_entry_name(name)
        if entry is not None and entry.uki:
            return uki_complete(self.uki_dir / name)
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


def uki_complete(path: Path) -> bool:
    """A UKI whose sections are all there: its .linux ends inside the file (a power cut may leave a short one)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            headers = read_headers(f.read(1 << 16), str(path))
    except (OSError, PEError):
        return False
    linux = headers.section(".linux")
    return linux is not None and linux.raw_offset + linux.raw_size <= size


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
