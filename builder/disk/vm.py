"""Boot a Kiln disk in QEMU: OVMF, virtio, serial console to a file, SSH on 127.0.0.1.

`start_vm(config)` is the one way to run a VM, for `kiln vm run` and the tests
alike: a context manager that always stops QEMU. The `VM` it yields waits for the
boot (console or SSH), runs commands over SSH (paramiko), powers off gracefully
(QMP `system_powerdown`) or pulls the plug (`kill`, for power-cut tests).

KVM is used when it works, TCG otherwise: on nested or paravirtual hosts /dev/kvm
exists but OVMF cannot run under it, so `auto` tries KVM once (`probe_kvm`) and
falls back. Each VM gets a private copy of OVMF's VARS file, so EFI variables
(the boot counter's selected entry, LoaderEntryOneShot ...) survive a reboot of
that VM and never leak into another. Guest networking is QEMU user-mode: the host
is 10.0.2.2 from inside the guest.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core.errors import ToolMissing, VMError
from builder.core.net import free_port
from builder.core.run import find_tool, spawn
from builder.disk.machine import (  # noqa: F401  (re-exported: the VM's firmware and accelerator)
    AAVMF_PAIRS,
    FIRMWARE,
    OVMF_HINT,
    OVMF_PAIRS,
    SLOWDOWN,
    Accel,
    Firmware,
    finalize_accel,
    finalize_boot_timeout,
    finalize_machine_argv,
    find_firmware,
    find_secure_firmware,
    probe_kvm,
)
from builder.disk.machine import stop_process as _stop
from builder.spec.schema import Architecture

HOST_FROM_GUEST = "10.0.2.2"  # QEMU user-mode networking: the host's loopback
# What the console shows once the image's golden inference check has passed (or failed).
HEALTH_UNIT = "kiln-health-inference.service"
LOGIN_PATTERN = r"login: "
# OVMF's boot manager when no boot option started (Secure Boot refused systemd-boot or the entry it chose, or
# there is no ESP): it waits for a key press, forever. A device's platform watchdog power-cycles it there.
FIRMWARE_GAVE_UP = "No bootable option or device was found"


@dataclass(frozen=True)
class VMConfig:
    """How to boot one disk. Frozen; `finalize_qemu_argv` turns it into QEMU's command line."""

    disk: Path
    accel: Accel = Accel.auto
    memory_mib: int = 1024
    cpus: int = 2
    ssh_port: int | None = None  # None: pick a free port
    ssh_key: Path | None = None
    ssh_user: str = "root"
    snapshot: bool = False  # writes go to a temp overlay, the disk stays untouched
    no_reboot: bool = False  # a guest reboot ends QEMU (a fresh QEMU per boot is steadier)
    workdir: Path | None = None  # VARS copy, console log, sockets; None: a temp dir removed afterwards
    ovmf_code: Path | None = None
    ovmf_vars: Path | None = None
    architecture: Architecture | None = None  # None: the disk's (finalize_disk_architecture)
    extra_args: tuple[str, ...] = ()
    tpm: bool = False  # a TPM 2.0 from swtpm, its state kept in WORKDIR/tpm (the same TPM on every boot)


@dataclass(frozen=True)
class VMPaths:
    workdir: Path
    vars: Path
    console: Path
    qmp: Path
    qga: Path
    qemu_log: Path
    tpm_state: Path
    tpm_sock: Path
    tpm_log: Path


def finalize_vm_paths(workdir: Path) -> VMPaths:
    return VMPaths(workdir=workdir, vars=workdir / "OVMF_VARS.fd", console=workdir / "console.log",
                   qmp=workdir / "qmp.sock", qga=workdir / "qga.sock", qemu_log=workdir / "qemu.log",
                   tpm_state=workdir / "tpm", tpm_sock=workdir / "swtpm.sock", tpm_log=workdir / "swtpm.log")


def finalize_disk_architecture(disk: Path) -> Architecture:
    """The architecture a Kiln disk boots: its record's (`kiln disk` writes `<disk>.json`), else the
    type of its root-a partition (a raw disk), else x86_64."""
    recorded = read_disk_record(disk).get("architecture")
    if recorded in {a.value for a in Architecture}:
        return Architecture(recorded)
    if finalize_disk_format(disk) == "raw":
        from builder.disk.assemble import ROOT_A, ROOT_TYPES
        from builder.disk.rawdisk import read_partition_table

        with contextlib.suppress(Exception):
            types = {p.get("type", "").upper() for p in read_partition_table(disk) if p.get("name") == ROOT_A}
            for arch, guid in ROOT_TYPES.items():
                if guid in types:
                    return arch
    return Architecture.x86_64


def finalize_disk_format(disk: Path) -> str:
    with disk.open("rb") as fh:
        return "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"


def finalize_qemu_argv(cfg: VMConfig, fw: Firmware, vp: VMPaths, accel: Accel, ssh_port: int) -> list[str]:
    """QEMU's command line for one VM. Pure."""
    arch = cfg.architecture or Architecture.x86_64
    drive = f"if=none,id=disk0,format={finalize_disk_format(cfg.disk)},file={cfg.disk},cache=writeback"
    if cfg.snapshot:
        drive += ",snapshot=on"
    argv = [
        arch.qemu_binary,
        "-name", "kiln,debug-threads=on",
        *finalize_machine_argv(arch, accel, secure_boot=fw.secure_boot),
        "-smp", str(cfg.cpus),
        "-m", str(cfg.memory_mib),
        "-nodefaults", "-display", "none",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vp.vars}",
        "-drive", drive,
        "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        # romfile=: no iPXE option ROM for OVMF to load and start (the guest never boots from the network)
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-device", "virtio-rng-pci",
        "-chardev", f"file,id=console,path={vp.console}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{vp.qmp},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga0,path={vp.qga},server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    if cfg.tpm:  # swtpm's control socket (start_vm starts it); a CRB TPM on x86, the MMIO TIS on Arm
        device = "tpm-crb" if arch is Architecture.x86_64 else "tpm-tis-device"
        argv += ["-chardev", f"socket,id=chrtpm,path={vp.tpm_sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", f"{device},tpmdev=tpm0"]
    if cfg.no_reboot:
        argv.append("-no-reboot")
    return [*argv, *cfg.extra_args]


# --- a running VM -------------------------------------------------------------


@dataclass
class SSHResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass
class VM:
    """One running QEMU. Made by `start_vm`; its methods raise VMError with the console tail."""

    config: VMConfig
    paths: VMPaths
    proc: subprocess.Popen[bytes]
    argv: list[str]
    accel: Accel
    ssh_port: int
    started: float = field(default_factory=time.monotonic)
    accel_note: str | None = None
    _ssh: Any = None

    # console

    def console_text(self) -> str:
        try:
            return self.paths.console.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        tail = self.console_text().splitlines()[-lines:]
        return "\n".join(_strip_ansi(line) for line in tail)

    def console_matches(self, pattern: str) -> bool:
        return re.search(pattern, _strip_ansi(self.console_text())) is not None

    def wait_for_console(self, pattern: str, timeout: float, *, fail: str | None = None) -> float:
        """Wait until the console matches `pattern`; seconds since QEMU started. `fail` aborts early."""
        want, bad = re.compile(pattern), re.compile(fail) if fail else None
        deadline = time.monotonic() + timeout
        while True:
            text = _strip_ansi(self.console_text())
            if want.search(text):
                return time.monotonic() - self.started
            if bad and (m := bad.search(text)):
                raise self.error(f"the console shows {m.group(0)!r}")
            self._check_alive()
            if time.monotonic() > deadline:
                raise self.error(f"timed out after {timeout:.0f} s waiting for {pattern!r} on the console")
            time.sleep(0.25)

    def wait_for_healthy(self, timeout: float = 900, unit: str = HEALTH_UNIT) -> float:
        """Wait until the golden inference check has passed (its unit is active); seconds since start.

        Asks the guest agent (no network or SSH key needed); systemd stops printing unit
        status on the serial console once a getty owns it, so the console cannot tell.
        """
        deadline = time.monotonic() + timeout
        last = "no answer from the guest agent yet"
        while time.monotonic() < deadline:
            self._check_alive()
            if self.firmware_gave_up():
                raise self.error("the firmware started nothing (\"" + FIRMWARE_GAVE_UP + "\"): Secure Boot refused "
                                 "the boot loader or the entry it chose, or the disk has no boot loader")
            try:
                state = self.guest_exec(f"systemctl is-active {unit}", check=False, timeout=30).stdout.strip()
            except (OSError, ValueError, VMError) as exc:
                last = f"guest agent: {exc}"
                time.sleep(2)
                continue
            if state == "active":
                return time.monotonic() - self.started
            if state == "failed":
                status = self.guest_exec(f"systemctl status --no-pager -n 30 {unit}", check=False).stdout
                raise self.error(f"{unit} failed:\n{_indent(status)}")
            last = f"{unit} is {state or 'unknown'}"
            time.sleep(1)
        raise self.error(f"timed out after {timeout:.0f} s waiting for {unit} to pass (last: {last})")

    def firmware_gave_up(self) -> bool:
        """Whether the firmware is waiting at its boot manager, having started nothing (FIRMWARE_GAVE_UP)."""
        return FIRMWARE_GAVE_UP in self.console_text()

    def healthy_slot(self, unit: str = HEALTH_UNIT) -> str | None:
        """The slot ("a" or "b", from kiln.slot= on the kernel command line) this boot runs when `unit`
        (the golden inference check) has passed; None while it has not, or while the guest agent cannot
        answer (the guest is starting, rebooting or gone)."""
        try:
            out = self.guest_exec(f"systemctl is-active {unit}; grep -o 'kiln.slot=[ab]' /proc/cmdline",
                                  check=False, timeout=30).stdout.split()
        except (OSError, ValueError, VMError):
            return None
        return out[1].removeprefix("kiln.slot=") if len(out) == 2 and out[0] == "active" else None

    def wait_for_boot(self, timeout: float = 600) -> float:
        """Up with SSH when the config has a key, else a login prompt; seconds since QEMU started."""
        if self.config.ssh_key is None:
            return self.wait_for_console(LOGIN_PATTERN, timeout)
        return self.wait_for_ssh(timeout)

    # ssh

    def wait_for_ssh(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        last = "no attempt yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self._connect()
                return time.monotonic() - self.started
            except Exception as exc:  # paramiko raises many kinds while sshd comes up
                last = f"{type(exc).__name__}: {exc}"
                self._ssh = None
                time.sleep(1)
        raise self.error(f"timed out after {timeout:.0f} s waiting for SSH on 127.0.0.1:{self.ssh_port} "
                         f"(last: {last})")

    def _connect(self) -> Any:
        if self._ssh is not None and self._ssh.get_transport() and self._ssh.get_transport().is_active():
            return self._ssh
        if self.config.ssh_key is None:
            raise VMError("this VM has no SSH key (VMConfig.ssh_key); only development classes get one")
        try:
            import paramiko
        except ImportError as exc:
            raise ToolMissing("paramiko is not installed; install it with: pip install paramiko") from exc
        _wait_for_banner(self.ssh_port)
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # its transport thread logs every retry
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_AcceptHostKey())
        client.connect("127.0.0.1", port=self.ssh_port, username=self.config.ssh_user,
                       key_filename=str(self.config.ssh_key), look_for_keys=False, allow_agent=False,
                       timeout=10, banner_timeout=10, auth_timeout=10)
        self._ssh = client
        return client

    def ssh(self, command: str, *, check: bool = True, timeout: float = 120) -> SSHResult:
        """Run `command` in the guest (a shell line) and return its exit status and output."""
        client = self._connect()
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        result = SSHResult(command, stdout.channel.recv_exit_status(), out, err)
        if check and not result.ok:
            raise VMError(f"in the VM, `{command}` exited {result.exit_status}: {(err or out).strip()[-2000:]}")
        return result

    def guest_exec(self, command: str, *, check: bool = True, timeout: float = 120) -> SSHResult:
        """Run a shell line through the QEMU guest agent (no network or SSH key needed)."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.paths.qga))
            reader = sock.makefile("rb")

            def readline() -> bytes:
                line = reader.readline()
                if not line:  # QEMU closes the channel when the guest's agent goes (a shutdown, a reboot)
                    raise VMError("guest agent: the channel closed (is the guest shutting down?)")
                return bytes(line)

            def call(execute: str, **arguments: Any) -> Any:
                sock.sendall(json.dumps({"execute": execute, "arguments": arguments}).encode() + b"\n")
                reply = json.loads(readline())
                if "error" in reply:
                    raise VMError(f"guest agent {execute}: {reply['error'].get('desc', reply['error'])}")
                return reply.get("return")

            token = int(time.time() * 1000) % 2**31
            sock.sendall(b"\xff")  # guest-sync-delimited: flush whatever a previous client left
            sock.sendall(json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
            while True:  # skip to the reply that carries our token
                line = readline().lstrip(b"\xff")
                if line.strip() and json.loads(line).get("return") == token:
                    break
            pid = call("guest-exec", path="/bin/sh", arg=["-c", command], **{"capture-output": True})["pid"]
            while True:
                status = call("guest-exec-status", pid=pid)
                if not isinstance(status, dict):
                    raise VMError(f"guest agent guest-exec-status: unexpected reply {status!r}")
                if status.get("exited"):
                    break
                if time.monotonic() > deadline:
                    raise self.error(f"guest agent: `{command}` still running after {timeout:.0f} s")
                time.sleep(0.1)
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        result = SSHResult(command, int(status.get("exitcode", -1)), out, err)
        if check and not result.ok:
            raise VMError(f"in the VM, `{command}` exited {result.exit_status}: {(err or out).strip()[-2000:]}")
        return result

    def close_ssh(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    # power

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command on the VM's monitor socket; its `return` value."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.paths.qmp))
            reader = sock.makefile("rb")
            json.loads(reader.readline())  # greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                sock.sendall(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
                while True:
                    reply = json.loads(reader.readline() or b"{}")
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise VMError(f"QMP {cmd}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def disk_bytes_written(self) -> int:
        """Bytes the guest has written to its disk since QEMU started (QMP query-blockstats of the
        drive `disk0`): what an update costs the device's storage, counted by QEMU, not by the guest."""
        stats = self.qmp("query-blockstats") or []
        for dev in stats:
            if dev.get("device") == "disk0":
                return int(dev["stats"]["wr_bytes"])
        raise VMError(f"QMP query-blockstats: no drive disk0 among {[d.get('device') for d in stats]}")

    def poweroff(self, timeout: float = 180) -> None:
        """Graceful: ACPI power button (QMP system_powerdown), wait for QEMU to exit; kill if it does not."""
        self.close_ssh()
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError, VMError, ValueError):
            self.qmp("system_powerdown")
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.error(f"the guest did not power off within {timeout:.0f} s; QEMU was killed") from None

    def kill(self) -> None:
        """Pull the plug: no shutdown, no flush (power-cut tests)."""
        self.close_ssh()
        _stop(self.proc, graceful=False)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"QEMU still running after {timeout:.0f} s") from None

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    # errors

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise self.error(f"QEMU exited with status {self.proc.returncode}")

    def error(self, message: str) -> VMError:
        qemu_log = ""
        with contextlib.suppress(OSError):
            qemu_log = self.paths.qemu_log.read_text(errors="replace").strip()
        parts = [message, f"console ({self.paths.console}), last lines:", _indent(self.console_tail() or "(empty)")]
        if qemu_log:
            parts += ["qemu:", _indent("\n".join(qemu_log.splitlines()[-10:]))]
        return VMError("\n".join(parts))


def _wait_for_banner(port: int, timeout: float = 5.0) -> None:
    """QEMU's user-mode net accepts on the forwarded port before sshd runs: read the banner first."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if not sock.recv(64).startswith(b"SSH-"):
            raise ConnectionError("no SSH banner yet")


class _AcceptHostKey:
    """Test VMs make their host keys on first boot, on 127.0.0.1: accept, never store."""

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        return None


def finalize_firmware(cfg: VMConfig) -> Firmware:
    """The given firmware; else, for a disk with verified boot (its record names enrolled variables), the
    secure OVMF build with them (Secure Boot enforcing); else the plain pair."""
    assert cfg.architecture is not None
    efivars = read_disk_record(cfg.disk).get("efivars")
    if cfg.ovmf_code is None and cfg.ovmf_vars is None and isinstance(efivars, str) and efivars:
        return find_secure_firmware(cfg.architecture, Path(efivars))
    return find_firmware(cfg.ovmf_code, cfg.ovmf_vars, cfg.architecture)


@contextlib.contextmanager
def start_vm(cfg: VMConfig) -> Iterator[VM]:
    """Boot `cfg.disk`; QEMU is always stopped (killed if still running) when the block ends."""
    if not cfg.disk.is_file():
        raise VMError(f"disk {cfg.disk} not found", hint="make one with `kiln disk CLASS`")
    if cfg.architecture is None:
        cfg = dataclasses.replace(cfg, architecture=finalize_disk_architecture(cfg.disk))
    assert cfg.architecture is not None
    qemu = find_tool(cfg.architecture.qemu_binary)
    fw = finalize_firmware(cfg)
    accel, note = finalize_accel(cfg.accel, qemu, fw, cfg.architecture)
    with contextlib.ExitStack() as stack:
        if cfg.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-vm-")))
        else:
            workdir = cfg.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        vp = finalize_vm_paths(workdir)
        if not vp.vars.exists():  # kept across boots of the same workdir (EFI variables persist)
            shutil.copyfile(fw.vars_template, vp.vars)
        for stale in (vp.console, vp.qmp, vp.qga, vp.qemu_log, vp.tpm_sock):
            stale.unlink(missing_ok=True)
        if cfg.tpm:
            stack.enter_context(running_swtpm(vp))
        port = cfg.ssh_port or free_port()
        argv = finalize_qemu_argv(cfg, fw, vp, accel, port)
        argv[0] = qemu
        # Its own session: Ctrl-C in a terminal reaches only Kiln, which powers the guest off
        # (QEMU would otherwise die at once on SIGINT). setsid execs QEMU: proc.pid is QEMU's.
        proc = spawn(["setsid", *argv], log=vp.qemu_log)
        vm = VM(config=cfg, paths=vp, proc=proc, argv=argv, accel=accel, ssh_port=port, accel_note=note)
        try:
            time.sleep(0.3)
            if proc.poll() is not None:
                raise vm.error(f"QEMU failed to start (exit status {proc.returncode})")
            yield vm
        finally:
            vm.close_ssh()
            _stop(proc)


@contextlib.contextmanager
def running_swtpm(vp: VMPaths) -> Iterator[None]:
    """swtpm for one boot, on a control socket QEMU connects to; its state (the TPM's seeds, persistent keys)
    stays in vp.tpm_state for the next boot. It ends when QEMU closes the socket, or with this block."""
    swtpm = find_tool("swtpm")
    vp.tpm_state.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = spawn([swtpm, "socket", "--tpm2", "--tpmstate", f"dir={vp.tpm_state.resolve()}",
                  "--ctrl", f"type=unixio,path={vp.tpm_sock}", "--terminate",
                  "--log", f"file={vp.tpm_log},level=1"], log=vp.tpm_log)
    try:
        deadline = time.monotonic() + 10
        while not vp.tpm_sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = vp.tpm_log.read_text(errors="replace")[-800:] if vp.tpm_log.exists() else ""
                raise VMError(f"swtpm did not start (exit status {proc.poll()})" + (f":\n{_indent(tail)}" if tail
                                                                                     else ""))
            time.sleep(0.05)
        yield
    finally:
        _stop(proc)


_ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _indent(text: str) -> str:
    return "\n".join(f"  | {line}" for line in text.splitlines())


# --- where a disk's SSH key lives ----------------------------------------------


def read_disk_record(disk: Path) -> dict[str, Any]:
    """The `<disk>.json` record `kiln disk` writes next to a disk, or {}."""
    record = disk.with_name(disk.name + ".json")
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
