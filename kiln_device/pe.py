"""PE/COFF headers, read with the standard library: what a unified kernel image (UKI) carries.

The agent reads a UKI's `.cmdline` and `.osrel` before it writes the UKI to the ESP (the layer
list digest the command line binds must be the one the device built); the builder adds sections
to systemd's stub with `builder.image.uki`, on the same parse. Offsets and field names follow the
PE format specification (Microsoft, "PE Format"): a DOS header whose e_lfanew points at "PE\\0\\0",
the COFF header, the optional header (PE32+ on x86_64 and arm64), then the section table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

PE32_PLUS = 0x20B
PE32 = 0x10B
SECTION_HEADER = 40
COFF_HEADER = 20
SECURITY_DIRECTORY = 4  # the data directory holding an Authenticode signature (the certificate table)
MACHINES = {0x8664: "x86_64", 0xAA64: "aarch64"}


class PEError(ValueError):
    """Not a PE image Kiln can read or extend: the message says what is wrong and where."""


@dataclass(frozen=True)
class Section:
    name: str
    virtual_size: int
    virtual_address: int
    raw_size: int
    raw_offset: int
    characteristics: int
    header_offset: int  # where its 40-byte header is in the file

    @property
    def virtual_end(self) -> int:
        return self.virtual_address + max(self.virtual_size, self.raw_size)


@dataclass(frozen=True)
class Headers:
    machine: int
    coff_offset: int
    optional_offset: int
    magic: int
    section_alignment: int
    file_alignment: int
    size_of_image: int
    size_of_headers: int
    table_offset: int
    sections: tuple[Section, ...]
    security: tuple[int, int]  # the certificate table's file offset and size; (0, 0) when unsigned

    @property
    def architecture(self) -> str:
        return MACHINES.get(self.machine, f"machine {self.machine:#x}")

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)


def read_headers(data: bytes, where: str = "the image") -> Headers:
    """The headers of a PE image in `data` (the whole file, or at least its headers)."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise PEError(f"{where} is not a PE image (no MZ header)")
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if pe + 4 + COFF_HEADER > len(data) or data[pe:pe + 4] != b"PE\0\0":
        raise PEError(f"{where} has no PE signature at {pe:#x}")
    coff = pe + 4
    machine, count, _, _, _, opt_size, _ = struct.unpack_from("<HHIIIHH", data, coff)
    opt = coff + COFF_HEADER
    if opt + opt_size > len(data) or opt_size < 2:
        raise PEError(f"{where}: the optional header runs past the file")
    (magic,) = struct.unpack_from("<H", data, opt)
    if magic == PE32_PLUS:
        dirs_count_at, dirs_at = 108, 112
    elif magic == PE32:
        dirs_count_at, dirs_at = 92, 96
    else:
        raise PEError(f"{where}: unknown optional header magic {magic:#x}")
    section_alignment, file_alignment = struct.unpack_from("<II", data, opt + 32)
    size_of_image, size_of_headers = struct.unpack_from("<II", data, opt + 56)
    (dirs_count,) = struct.unpack_from("<I", data, opt + dirs_count_at)
    security = (0, 0)
    if dirs_count > SECURITY_DIRECTORY and dirs_at + 8 * SECURITY_DIRECTORY + 8 <= opt_size:
        security = struct.unpack_from("<II", data, opt + dirs_at + 8 * SECURITY_DIRECTORY)
    table = opt + opt_size
    if table + count * SECTION_HEADER > len(data):
        raise PEError(f"{where}: the section table runs past the file")
    sections = []
    for i in range(count):
        at = table + i * SECTION_HEADER
        raw_name, vsize, vaddr, rsize, roff, _, _, _, _, chars = struct.unpack_from("<8sIIIIIIHHI", data, at)
        sections.append(Section(raw_name.rstrip(b"\0").decode("ascii", errors="replace"), vsize, vaddr, rsize,
                                roff, chars, at))
    if not section_alignment or not file_alignment:
        raise PEError(f"{where}: zero section or file alignment")
    return Headers(machine, coff, opt, magic, section_alignment, file_alignment, size_of_image, size_of_headers,
                   table, tuple(sections), (int(security[0]), int(security[1])))


def section_bytes(path: Path, name: str, limit: int = 1 << 20) -> bytes | None:
    """The content of section `name` of the PE image at `path` (without its file-alignment padding),
    None when it has none. Sections over `limit` bytes are refused (the small ones are what is read)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        headers = read_headers(head, str(path))
        sec = headers.section(name)
        if sec is None:
            return None
        size = min(sec.virtual_size or sec.raw_size, sec.raw_size)
        if size > limit:
            raise PEError(f"{path}: section {name} is {size} bytes, more than {limit}")
        f.seek(sec.raw_offset)
        data = f.read(size)
    if len(data) != size:
        raise PEError(f"{path}: section {name} runs past the end of the file")
    return data


def text_section(path: Path, name: str) -> str | None:
    """A text section (`.cmdline`, `.osrel`, `.uname`) as a string, trailing NULs and blanks removed."""
    data = section_bytes(path, name)
    if data is None:
        return None
    return data.rstrip(b"\0").decode("utf-8", errors="replace").strip()
