"""Unified kernel images (UKIs): systemd's stub with the kernel, initramfs and command line in it.

    make_uki(stub, UkiParts(kernel=..., initrd=..., cmdline="...", osrel="...", uname="6.1.0-..."), out)

Debian 12 has no `ukify` (systemd 252), so Kiln adds the sections itself, the way the Boot
Loader Specification's type #2 entries and ukify lay them out: each new section starts after the
stub's last one, at an address aligned to the stub's own SectionAlignment (never a fixed VMA: that
corrupts current stubs, systemd #24202), its bytes appended at the end aligned to FileAlignment,
with `.linux` last because the stub may grow the kernel's image past its section. What follows the
stub's last section (a COFF symbol table) is dropped. The image is then signed (sbsign, with the
Secure Boot db key: builder.keys.secureboot), which adds the certificate table at the end.

Everything is deterministic: the same stub, kernel, initramfs and text give the same bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import BuildError
from kiln_device.pe import SECTION_HEADER, PEError, read_headers

# IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ: what ukify gives every section it adds.
DATA_SECTION = 0x00000040 | 0x40000000
STUB_DIR = "usr/lib/systemd/boot/efi"
STUB_NAMES = {"x86_64": "linuxx64.efi.stub", "aarch64": "linuxaa64.efi.stub"}


@dataclass(frozen=True)
class UkiParts:
    kernel: Path
    initrd: Path
    cmdline: str
    osrel: str
    uname: str

    def sections(self) -> list[tuple[str, bytes]]:
        """In the order they go into the image: the small text sections, then .initrd, then .linux last."""
        return [(".osrel", self.osrel.encode()), (".cmdline", self.cmdline.encode() + b"\0"),
                (".uname", self.uname.encode()), (".initrd", self.initrd.read_bytes()),
                (".linux", self.kernel.read_bytes())]


def align(value: int, to: int) -> int:
    return -(-value // to) * to


def find_stub(rootfs: Path, architecture: str) -> Path:
    """The image's own stub (its systemd-boot-efi, the same systemd as its bootctl), else this machine's."""
    name = STUB_NAMES.get(architecture)
    if name is None:
        raise BuildError(f"no systemd stub is known for {architecture}")
    for candidate in (rootfs / STUB_DIR / name, Path("/") / STUB_DIR / name):
        if candidate.is_file():
            return candidate
    raise BuildError(f"the systemd stub {STUB_DIR}/{name} is neither in the image nor on this machine",
                     hint="install it with: apt-get install systemd-boot-efi")


def add_sections(stub: bytes, sections: Sequence[tuple[str, bytes]], where: str = "the stub") -> bytes:
    """`stub` with `sections` added after its own, headers updated. Pure."""
    try:
        h = read_headers(stub, where)
    except PEError as exc:
        raise BuildError(str(exc)) from None
    if h.security != (0, 0):
        raise BuildError(f"{where} is already signed; a UKI is built from an unsigned stub and signed after")
    if not h.sections:
        raise BuildError(f"{where} has no sections")
    names = {s.name for s in h.sections}
    for name, _ in sections:
        if len(name.encode()) > 8:
            raise BuildError(f"section name {name!r} is longer than 8 bytes")
        if name in names:
            raise BuildError(f"{where} already has a {name} section")
    table_end = h.table_offset + (len(h.sections) + len(sections)) * SECTION_HEADER
    first_raw = min((s.raw_offset for s in h.sections if s.raw_size), default=h.size_of_headers)
    if table_end > min(h.size_of_headers, first_raw):
        raise BuildError(f"{where} has no room for {len(sections)} more section headers "
                         f"(the table would end at {table_end:#x}, the headers at {h.size_of_headers:#x})")
    raw_end = max(s.raw_offset + s.raw_size for s in h.sections)
    out = bytearray(stub[:raw_end])  # the COFF symbol table after the last section, if any, goes
    out += bytes(align(len(out), h.file_alignment) - len(out))
    vaddr = align(max(s.virtual_end for s in h.sections), h.section_alignment)
    headers = bytearray()
    added_init = 0
    for name, data in sections:
        raw_size = align(len(data), h.file_alignment)
        headers += struct.pack("<8sIIIIIIHHI", name.encode(), len(data), vaddr, raw_size, len(out), 0, 0, 0, 0,
                               DATA_SECTION)
        out += data + bytes(raw_size - len(data))
        added_init += raw_size
        vaddr = align(vaddr + len(data), h.section_alignment)
    at = h.table_offset + len(h.sections) * SECTION_HEADER
    out[at:at + len(headers)] = headers
    struct.pack_into("<H", out, h.coff_offset + 2, len(h.sections) + len(sections))  # NumberOfSections
    struct.pack_into("<II", out, h.coff_offset + 8, 0, 0)  # no COFF symbol table any more
    (init,) = struct.unpack_from("<I", out, h.optional_offset + 8)
    struct.pack_into("<I", out, h.optional_offset + 8, init + added_init)  # SizeOfInitializedData
    struct.pack_into("<I", out, h.optional_offset + 56, vaddr)  # SizeOfImage: aligned to SectionAlignment
    struct.pack_into("<I", out, h.optional_offset + 64, 0)  # CheckSum: sbsign sets it
    return bytes(out)


def make_uki(stub: Path, parts: UkiParts, out: Path) -> str:
    """Write the UKI to `out` (unsigned); returns its sha256."""
    data = add_sections(stub.read_bytes(), parts.sections(), str(stub))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return hashlib.sha256(data).hexdigest()
