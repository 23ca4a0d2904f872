"""Foreign architectures on this build host: qemu-user through binfmt_misc, checked before any work.

    why_not_emulated(Architecture.aarch64)   # None, or what is missing, in words a person can act on
    check_emulation(Architecture.aarch64)    # BuildError with a hint; nothing is built without it

An arm64 class built on an x86_64 host runs arm64 binaries three ways: mmdebstrap's maintainer
scripts in the base's chroot, `podman build --platform linux/arm64`'s RUN steps, and the model
gate's runtime (builder.model). All three need the kernel to hand arm64 ELF files to
qemu-aarch64, with the `F` flag (the interpreter is opened when it is registered, so it works
inside chroots and containers that do not have it). `scripts/setup.sh` installs and registers it.
"""

from __future__ import annotations

import platform
from pathlib import Path

from builder.core.errors import BuildError
from builder.spec.schema import Architecture

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# The CPU an emulated device has, the same for the VM (qemu-system, builder.disk.vm) and the model gate
# (qemu-user, builder.model.runtime_image: QEMU_CPU): the gate measures what the VM runs. QEMU's `max`,
# with pointer authentication emulated QEMU's way (about 1.5x faster under TCG than QARMA) and
# without SME: qemu-user 7.2 offers SME to programs, onnxruntime 1.32's dynamic-INT8 MatMul then takes
# its SME path, and the digits model's int8-dynamic candidate scores 0.108 instead of 0.986 (measured
# 2026-12-06; with sme=off, or QEMU_CPU cortex-a72, neoverse-n1 or a64fx, it scores 0.986, as on
# x86_64 and in the booted VM, whose kernel offers no SME). No arm64 edge board Kiln targets has SME.
EMULATED_CPU = {Architecture.aarch64: "max,pauth-impdef=on,sme=off", Architecture.x86_64: "max"}
SETUP_HINT = ("run ./scripts/setup.sh as root (it installs qemu-user-static, binfmt-support and arch-test, "
              "mounts binfmt_misc and registers qemu), or build on a {arch} machine")


def host_architecture() -> Architecture | None:
    machine = platform.machine().lower()
    return {"x86_64": Architecture.x86_64, "amd64": Architecture.x86_64,
            "aarch64": Architecture.aarch64, "arm64": Architecture.aarch64}.get(machine)


def needs_emulation(arch: Architecture) -> bool:
    return host_architecture() is not arch


def read_binfmt_entry(arch: Architecture, binfmt_dir: Path | None = None) -> dict[str, str] | None:
    """The registration of qemu-<arch> (`enabled`, `interpreter`, `flags`), None when there is none."""
    path = (binfmt_dir or BINFMT_DIR) / f"qemu-{arch.value}"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    entry: dict[str, str] = {"enabled": ""}
    for line in lines:
        if line in ("enabled", "disabled"):
            entry["enabled"] = line
        elif " " in line:
            key, _, value = line.partition(" ")
            entry[key.rstrip(":")] = value.strip()
    return entry


def why_not_emulated(arch: Architecture, binfmt_dir: Path | None = None) -> str | None:
    """Why this host cannot run `arch` binaries in chroots and containers (None: it can, or is `arch`)."""
    if not needs_emulation(arch):
        return None
    binfmt_dir = binfmt_dir or BINFMT_DIR
    host = platform.machine()
    if not (binfmt_dir / "status").exists():
        return (f"{arch.value} binaries cannot run on this {host} host: binfmt_misc is not mounted at "
                f"{binfmt_dir} (a container without it, or no privileges to mount it)")
    entry = read_binfmt_entry(arch, binfmt_dir)
    if entry is None:
        return f"{arch.value} binaries cannot run on this {host} host: no qemu-{arch.value} binfmt_misc registration"
    if entry.get("enabled") != "enabled":
        return f"{arch.value} binaries cannot run on this {host} host: qemu-{arch.value} is registered but disabled"
    if "F" not in entry.get("flags", "") and not Path(entry.get("interpreter", "/nonexistent")).exists():
        return (f"qemu-{arch.value} is registered to {entry.get('interpreter')}, which is not on this host")
    if "F" not in entry.get("flags", ""):
        return (f"qemu-{arch.value} is registered without the F flag (flags: {entry.get('flags') or 'none'}): "
                "chroots and containers cannot find the interpreter; use qemu-user-static's registration")
    # With F the kernel opened the interpreter at registration: it need not exist here (a builder
    # container of a host that registered it), and chroots and containers work without it.
    return None


def check_emulation(arch: Architecture) -> None:
    """Refuse, before any work, a foreign-architecture build this host cannot run."""
    why = why_not_emulated(arch)
    if why is not None:
        raise BuildError(f"cannot build for {arch.value} here: {why}", hint=SETUP_HINT.format(arch=arch.value))
