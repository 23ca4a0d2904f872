"""Unified kernel images as Kiln assembles them (builder.image.uki) and reads them (kiln_device.pe), and
the Secure Boot keys that sign them (builder.keys.secureboot): checked against independent readers
(binutils' objdump, sbverify), not only against Kiln's own parser."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from builder.core.errors import BuildError, UsageError
from builder.image.uki import UkiParts, add_sections, make_uki
from builder.keys import secureboot
from kiln_device import contract
from kiln_device.pe import read_headers, section_bytes, text_section
from tests.conftest import require_tool

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")


@pytest.fixture
def stub() -> Path:
    if not STUB.is_file():
        require_tool(f"{STUB} (apt-get install systemd-boot-efi)")
    return STUB


def parts(tmp: Path, kernel: bytes = b"K" * 5000, initrd: bytes = b"I" * 70000) -> UkiParts:
    (tmp / "vmlinuz").write_bytes(kernel)
    (tmp / "initrd").write_bytes(initrd)
    return UkiParts(tmp / "vmlinuz", tmp / "initrd", "root=PARTLABEL=root-a ro kiln.slot=a", "ID=debian\n", "6.1.0-x")


def test_sections_follow_the_stubs_at_aligned_addresses_with_linux_last(stub: Path, tmp_path: Path) -> None:
    out = tmp_path / "kiln-a.efi"
    make_uki(stub, parts(tmp_path), out)
    before, after = read_headers(stub.read_bytes()), read_headers(out.read_bytes())
    assert after.sections[:len(before.sections)] == before.sections  # the stub's own are untouched
    added = after.sections[len(before.sections):]
    assert [s.name for s in added] == [".osrel", ".cmdline", ".uname", ".initrd", ".linux"]
    end = max(s.virtual_end for s in before.sections)
    for sec in added:
        assert sec.virtual_address >= end and sec.virtual_address % after.section_alignment == 0
        assert sec.raw_offset % after.file_alignment == 0
        end = sec.virtual_address + sec.virtual_size
    assert after.size_of_image >= end and after.size_of_image % after.section_alignment == 0
    assert section_bytes(out, ".initrd", limit=1 << 20) == b"I" * 70000
    assert text_section(out, ".cmdline") == "root=PARTLABEL=root-a ro kiln.slot=a"
    # binutils reads the same table: every section, each at the address Kiln gave it
    require_tool("objdump")
    dump = subprocess.run(["objdump", "-h", str(out)], capture_output=True, text=True, check=True).stdout
    for sec in added:
        line = next(ln for ln in dump.splitlines() if f" {sec.name} " in ln)
        assert f"{sec.virtual_size:08x}" in line, line


def test_the_same_parts_give_the_same_bytes(stub: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.efi", tmp_path / "b.efi"
    assert make_uki(stub, parts(tmp_path), a) == make_uki(stub, parts(tmp_path), b)
    assert a.read_bytes() == b.read_bytes()


def test_a_signed_stub_and_a_full_section_table_are_refused(stub: Path, tmp_path: Path) -> None:
    data = bytearray(stub.read_bytes())
    h = read_headers(bytes(data))
    struct.pack_into("<II", data, h.optional_offset + 112 + 8 * 4, 0x1000, 0x20)  # a certificate table
    with pytest.raises(BuildError, match="already signed"):
        add_sections(bytes(data), parts(tmp_path).sections())
    many = [(f".s{i}", b"x") for i in range(40)]
    with pytest.raises(BuildError, match="no room for 40 more section headers"):
        add_sections(stub.read_bytes(), many)
    with pytest.raises(BuildError, match="longer than 8 bytes"):
        add_sections(stub.read_bytes(), [(".toolongname", b"x")])


def test_db_signs_a_uki_that_sbverify_accepts_and_a_changed_byte_breaks(stub: Path, tmp_path: Path) -> None:
    require_tool("sbsign")
    keys = secureboot.make_secureboot_keys(tmp_path / "sb", "a passphrase")
    uki = tmp_path / "kiln-a.efi"
    make_uki(stub, parts(tmp_path), uki)
    secureboot.sign_efi(keys, uki, "a passphrase")
    assert secureboot.verify_efi(keys, uki)
    assert read_headers(uki.read_bytes()).security != (0, 0)
    assert text_section(uki, ".cmdline") == "root=PARTLABEL=root-a ro kiln.slot=a"  # still readable signed
    other = secureboot.make_secureboot_keys(tmp_path / "other", None)
    assert not secureboot.verify_efi(other, uki)  # signed by this class's db only
    tampered = tmp_path / "tampered.efi"
    data = bytearray(uki.read_bytes())
    at = read_headers(bytes(data)).section(".cmdline")
    assert at is not None
    data[at.raw_offset] ^= 0x01
    tampered.write_bytes(bytes(data))
    assert not secureboot.verify_efi(keys, tampered)
    assert not list(Path("/dev/shm").glob("kiln-sb-*")), "the decrypted db key was left behind"
    # At the build's epoch the signature is reproducible (sbsign signs its clock's time): the same image twice.
    require_tool("faketime")
    unsigned = tmp_path / "unsigned.efi"
    make_uki(stub, parts(tmp_path), unsigned)
    again = [secureboot.sign_efi(keys, unsigned, "a passphrase", out=tmp_path / f"r{i}.efi", epoch=1735689600)
             for i in range(2)]
    assert again[0].read_bytes() == again[1].read_bytes() and secureboot.verify_efi(keys, again[0])


def test_secure_boot_keys_are_private_and_need_their_passphrase(tmp_path: Path) -> None:
    keys = secureboot.make_secureboot_keys(tmp_path / "sb", "right")
    assert (keys.directory.stat().st_mode & 0o777) == 0o700
    assert all((keys.key(r).stat().st_mode & 0o777) == 0o600 for r in secureboot.ROLES)
    assert b"ENCRYPTED" in keys.key("db").read_bytes()
    with pytest.raises(UsageError, match="passphrase does not open it"), \
            secureboot.plain_key(keys, "db", "wrong"):
        pass
    with pytest.raises(UsageError, match="no passphrase was given"), secureboot.plain_key(keys, "db", None):
        pass
    with pytest.raises(UsageError, match="already holds Secure Boot keys"):
        secureboot.make_secureboot_keys(tmp_path / "sb", "right")
    (tmp_path / "sb").chmod(0o755)
    with pytest.raises(UsageError, match="readable by group or others"):
        secureboot.read_secureboot_keys(tmp_path / "sb")


def test_enrolled_variables_hold_kilns_pk_kek_and_db(tmp_path: Path) -> None:
    blank = secureboot.BLANK_VARS["x86_64"]
    if not blank.is_file():
        require_tool(f"{blank} (apt-get install ovmf)")
    keys = secureboot.make_secureboot_keys(tmp_path / "sb", None)
    out = secureboot.make_enrolled_vars(keys, blank, tmp_path / "vars.fd")
    tool = shutil.which("virt-fw-vars") or str(Path(sys.executable).parent / "virt-fw-vars")
    shown = subprocess.run([tool, "-i", str(out), "--print", "--verbose"], capture_output=True, text=True,
                           check=True).stdout
    for role in ("PK", "KEK", "db"):
        assert f"Kiln Secure Boot {role}" in shown, role
    assert "Microsoft" not in shown  # only Kiln's keys: nothing else this firmware would boot


def test_entry_names_and_the_bound_command_line() -> None:
    name = contract.entry_name("1.2.0", "b", 3, uki=True)
    assert name == "kiln-1.2.0-b+3.efi"
    entry = contract.parse_entry_name("kiln-1.2.0-b+2-1.efi")
    assert entry is not None and entry.uki and (entry.slot, entry.tries_left, entry.tries_done) == ("b", 2, 1)
    conf = contract.parse_entry_name("kiln-1.2.0-b.conf")
    assert conf is not None and not conf.uki and conf.blessed
    assert contract.parse_entry_name("kiln-1.2.0-b.staged") is None
    digest = contract.layers_digest("a b\n")
    line = contract.render_uki_cmdline(slot="b", layers=digest, kargs=("quiet",))
    assert contract.read_cmdline_slot(line) == "b"
    assert contract.read_cmdline_value(line, contract.LAYERS_KARG) == digest
    assert line.split()[0] == "root=PARTLABEL=root-b"


def test_the_devices_secure_boot_state_from_its_efi_variables(tmp_path: Path) -> None:
    from kiln_device.agent.bootctl import EFI_GLOBAL_GUID, secure_boot_state

    assert secure_boot_state(tmp_path) is None  # no EFI variables: not a UEFI boot, or not mounted

    def put(name: str, value: int) -> None:
        (tmp_path / f"{name}-{EFI_GLOBAL_GUID}").write_bytes(b"\x06\x00\x00\x00" + bytes([value]))

    put("SecureBoot", 1)
    put("SetupMode", 0)
    assert secure_boot_state(tmp_path) == "enabled"
    put("SecureBoot", 0)
    assert secure_boot_state(tmp_path) == "disabled"
    put("SetupMode", 1)
    assert secure_boot_state(tmp_path) == "setup"  # no PK enrolled: the firmware enforces nothing
