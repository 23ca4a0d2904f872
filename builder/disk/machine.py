"""The machine a Kiln disk boots in: UEFI firmware per architecture, QEMU's board and CPU, KVM or TCG.

    fw = find_firmware(arch=Architecture.aarch64)       # AAVMF CODE + VARS template
    accel, note = finalize_accel(Accel.auto, qemu, fw, arch)
    argv = finalize_machine_argv(arch, accel)            # q35 on x86_64, virt on arm64

KVM is used when it works, TCG otherwise: on nested or paravirtual hosts /dev/kvm exists but
OVMF cannot run under it, so `auto` tries KVM once (`probe_kvm`) and falls back. A guest of another
architecture than the host's always runs under TCG. builder.disk.vm boots with these.
"""

from __future__ import annotations

import enum
import functools
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from builder.base.emulation import EMULATED_CPU, needs_emulation
from builder.core.errors import ToolMissing, VMError
from builder.core.run import spawn
from builder.spec.schema import Architecture

OVMF_PAIRS = (  # (CODE, VARS) that belong together; Debian, then Fedora/Arch
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
)
# arm64: AAVMF (EDK II for QEMU's virt machine), Debian's qemu-efi-aarch64, then Fedora's edk2-aarch64.
AAVMF_PAIRS = (
    ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
    ("/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw", "/usr/share/edk2/aarch64/vars-template-pflash.raw"),
)
FIRMWARE = {Architecture.x86_64: (OVMF_PAIRS, "OVMF", "apt-get install ovmf"),
            Architecture.aarch64: (AAVMF_PAIRS, "AAVMF", "apt-get install qemu-efi-aarch64")}
OVMF_HINT = "install it with: apt-get install ovmf (or pass --ovmf-code/--ovmf-vars)"
# How much longer than an x86_64 guest an emulated guest may take (TCG both, on an x86_64 host): the
# default waits of `kiln demo`, `kiln vm run --check` and the arm64 tests are scaled by it. Measured
# here (2 cores, multi-threaded TCG, QEMU's pointer authentication): arm64-vision healthy 35.6 s after
# QEMU started, qemu-x86_64 30-35 s; reported elsewhere: 180-250 s against 19-28 s (design.md), so
# the waits allow for a host where arm64 is that much slower.
SLOWDOWN = {Architecture.x86_64: 1.0, Architecture.aarch64: 4.0}
BOOT_TIMEOUT = 900.0  # seconds to healthy for an x86_64 guest under TCG on a busy 2-core host


def finalize_boot_timeout(arch: Architecture) -> float:
    """How long to wait for a guest of ARCH to pass its health check here."""
    return BOOT_TIMEOUT * (SLOWDOWN[arch] if needs_emulation(arch) else 1.0)


class Accel(enum.StrEnum):
    auto = "auto"
    kvm = "kvm"
    tcg = "tcg"


@dataclass(frozen=True)
class Firmware:
    code: Path
    vars_template: Path
    secure_boot: bool = False  # the secure build of OVMF (SMM), its variables enrolled: Secure Boot enforcing


# The secure build of OVMF: Secure Boot can only be enforced with the variable store behind SMM.
SECBOOT_CODE = {Architecture.x86_64: Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")}


def find_secure_firmware(arch: Architecture, enrolled_vars: Path) -> Firmware:
    """OVMF's secure build with a disk's enrolled variable store (`kiln disk` writes it for a verified image)."""
    code = SECBOOT_CODE.get(arch)
    if code is None:
        raise VMError(f"Secure Boot in QEMU is wired up for x86_64 only, not {arch.value}")
    if not code.is_file():
        raise ToolMissing(f"the secure OVMF build {code} is not installed", hint=OVMF_HINT)
    if not enrolled_vars.is_file():
        raise VMError(f"the disk's enrolled firmware variables {enrolled_vars} are missing",
                      hint="make the disk again with `kiln disk` (it writes <disk>.efivars.fd beside it)")
    return Firmware(code, enrolled_vars, secure_boot=True)


def find_firmware(code: Path | None = None, vars_template: Path | None = None,
                  arch: Architecture = Architecture.x86_64) -> Firmware:
    """UEFI CODE + VARS for `arch` (OVMF, AAVMF): the given paths (both must exist), else the first
    installed pair."""
    if code is not None or vars_template is not None:
        if code is None or vars_template is None:
            raise VMError("OVMF code and vars go together: pass both --ovmf-code and --ovmf-vars")
        for what, path in (("OVMF code", code), ("OVMF vars", vars_template)):
            if not path.is_file():
                raise ToolMissing(f"{what} firmware {path} not found", hint=OVMF_HINT)
        return Firmware(code, vars_template)
    pairs, name, install = FIRMWARE[arch]
    for c, v in pairs:
        if Path(c).is_file() and Path(v).is_file():
            return Firmware(Path(c), Path(v))
    tried = ", ".join(c for c, _ in pairs)
    raise ToolMissing(f"{name} (UEFI firmware for {arch.value} QEMU) not found; looked for {tried}",
                      hint=f"install it with: {install} (or pass --ovmf-code/--ovmf-vars)")


def finalize_machine_argv(arch: Architecture, accel: Accel, *, secure_boot: bool = False) -> list[str]:
    """The board, CPU and accelerator: q35 on x86_64 (with SMM and the variable store's flash locked to it
    for Secure Boot); the virt machine on arm64."""
    cpu = "host" if accel is Accel.kvm else "max"
    if arch is Architecture.aarch64:
        # the emulated CPU (builder.base.emulation.EMULATED_CPU: max, QEMU's fast pointer authentication,
        # no SME); multi-threaded TCG; a PCI watchdog (the virt board has none of its own)
        tcg = "tcg,thread=multi" if accel is Accel.tcg else accel.value
        return ["-machine", "virt", "-accel", tcg, "-cpu", EMULATED_CPU[arch] if cpu == "max" else cpu,
                "-device", "i6300esb", "-action", "watchdog=reset"]
    # the ICH9 TCO watchdog may reset the board, as on real ones (QEMU 7.2 strap: never)
    machine = ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"] \
        if secure_boot else ["-machine", "q35"]
    return [*machine, "-global", "ICH9-LPC.noreboot=off", "-accel", accel.value, "-cpu",
            EMULATED_CPU[arch] if cpu == "max" else cpu]


# --- KVM or TCG ---------------------------------------------------------------


@functools.cache
def probe_kvm(qemu: str, code: Path, vars_template: Path, timeout: float = 20.0,
              arch: Architecture = Architecture.x86_64) -> str | None:
    """None when the UEFI firmware runs under KVM here, else why not (measured by booting it without a
    disk, on ARCH's board)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="kiln-kvm-probe-") as tmp:
        vars_copy = Path(tmp) / "vars.fd"
        shutil.copyfile(vars_template, vars_copy)
        log = Path(tmp) / "serial.log"
        argv = [qemu, *finalize_machine_argv(arch, Accel.kvm), "-m", "256", "-nodefaults",
                "-display", "none", "-net", "none",
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
                "-serial", f"file:{log}"]  # fmt: skip
        proc = spawn(argv, log=Path(tmp) / "qemu.log", quiet=True)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if log.exists() and b"BdsDxe" in log.read_bytes():
                    return None  # OVMF reached its boot manager
                if proc.poll() is not None:
                    err = (Path(tmp) / "qemu.log").read_text(errors="replace").strip().splitlines()
                    return f"QEMU exited under KVM: {err[0] if err else 'no message'}"
                time.sleep(0.2)
            return f"OVMF did not reach its boot manager under KVM within {timeout:.0f} s"
        finally:
            stop_process(proc)


def finalize_accel(requested: Accel, qemu: str, fw: Firmware,
                   arch: Architecture = Architecture.x86_64) -> tuple[Accel, str | None]:
    """The accelerator to use and, when auto fell back to TCG, why KVM was not used."""
    if requested is Accel.tcg:
        return Accel.tcg, None
    if needs_emulation(arch):
        if requested is Accel.kvm:
            raise VMError(f"KVM cannot run an {arch.value} guest on this {platform.machine()} host",
                          hint="use --accel tcg (or auto)")
        return Accel.tcg, f"an {arch.value} guest on a {platform.machine()} host: TCG"
    why = probe_kvm(qemu, fw.code, fw.vars_template, arch=arch)
    if why is None:
        return Accel.kvm, None
    if requested is Accel.kvm:
        raise VMError(f"KVM does not work here: {why}", hint="use --accel tcg (or auto)")
    return Accel.tcg, f"KVM does not work here ({why}); using TCG"


def stop_process(proc: subprocess.Popen[bytes], *, graceful: bool = True) -> None:
    if proc.poll() is not None:
        return
    if graceful:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait(timeout=30)

