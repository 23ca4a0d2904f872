"""`kiln disk` and `kiln vm run`: from an image to a booted device."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from builder.cli.common import checked, cli_context, console, err_console
from builder.core import paths
from builder.disk import vm


@click.command("disk")
@click.argument("source", metavar="CLASS|IMAGE|ROOTFS")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Disk file (default build/<class>/<version>/disk.<format>).")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True)
@click.option("--size", help="Whole disk size (e.g. 8GiB); the data partition takes what the spec's "
              "esp and root partitions leave. Default: the sizes in spec.disk.")
@click.option("--version", "version", help="With CLASS: which build (default: the newest). "
              "With IMAGE or ROOTFS: the version the disk is named for (default: release.json's).")
@click.option("--etc", "etc", multiple=True, metavar="DEST=FILE",
              help="Put FILE in this device's /etc as DEST (relative to /etc, e.g. kiln/agent.json=site.json), "
              "in the data partition; repeatable. kiln/agent.json is checked as the agent reads it.")
@click.option("--json", "as_json", is_flag=True, help="Print the disk record as JSON.")
def disk_cmd(source: str, output: Path | None, fmt: str, size: str | None, version: str | None,
             etc: tuple[str, ...], as_json: bool) -> None:
    """Write a bootable A/B GPT disk (esp | root-a | root-b | data) from an image.

    SOURCE is a class (its newest build, or --version's), an image in Kiln's
    store (localhost/kiln/CLASS:VERSION) or an unpacked rootfs directory.
    Nothing is mounted; nothing is written when the image does not fit.
    A device's own settings (its registry and channel, site drop-ins) go in with --etc:
    the image stays the same for every device of the class.
    """
    from builder.core.safe import byte_size, format_size
    from builder.disk.assemble import make_disk, resolve_source
    from builder.disk.provision import check_unique, parse_etc

    size_bytes = checked("--size", byte_size, size) if size is not None else None
    etc_files = [parse_etc(spec) for spec in etc]
    check_unique(etc_files)
    ref, version = resolve_source(source, version)
    record = make_disk(cli_context(), ref, output=output, fmt=fmt, size=size_bytes, version=version,
                       etc=etc_files)
    if as_json:
        click.echo(json.dumps(record.to_dict(), indent=2))
        return
    click.echo(f"disk {record.output} ({record.format}, {format_size(record.size)}, "
               f"{format_size(record.file_size)} on disk): {record.class_name} {record.version}, "
               f"root-a {format_size(record.root_image_size)} erofs")
    click.echo(f"boot it: kiln vm run {record.output}")


@click.group("vm")
def vm_group() -> None:
    """Boot disks in QEMU (OVMF, KVM when it works, else TCG)."""


@vm_group.command("run")
@click.argument("disk", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--ssh-port", type=click.IntRange(1, 65535), help="Host port forwarded to the guest's "
              "SSH (127.0.0.1 only; default: a free port).")
@click.option("--snapshot", is_flag=True, help="Throw away the guest's writes (the disk stays as it is).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto: KVM if OVMF runs under it here, else TCG.")
@click.option("--memory", "memory_mib", type=click.IntRange(256), default=1024, show_default=True,
              help="Guest RAM in MiB.")
@click.option("--ssh-key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Private key for root (default: the class's development key, build/<class>/ssh/).")
@click.option("--ovmf-code", type=click.Path(path_type=Path, dir_okay=False), help="OVMF CODE firmware.")
@click.option("--ovmf-vars", type=click.Path(path_type=Path, dir_okay=False),
              help="OVMF VARS template (copied per VM).")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the VM's EFI variables and console log here (default: a temp dir).")
@click.option("--tpm", is_flag=True, help="Give the VM a TPM 2.0 (swtpm; its state is kept in WORKDIR/tpm, so "
              "a device key made in it survives the next boot with the same --workdir).")
@click.option("--check", is_flag=True, help="Boot, wait until the golden health check passes, power off; "
              "exit 10 when it does not.")
@click.option("--timeout", type=float, default=None,
              help="With --check: seconds to wait for the health check (default: 900, times the emulation "
                   "allowance of an arm64 disk on an x86_64 host).")
def vm_run(disk: Path, ssh_port: int | None, snapshot: bool, accel: str, memory_mib: int,
           ssh_key: Path | None, ovmf_code: Path | None, ovmf_vars: Path | None, workdir: Path | None,
           tpm: bool, check: bool, timeout: float | None) -> None:
    """Boot DISK in QEMU; follow its console until it powers off (Ctrl-C powers it off)."""
    record = vm.read_disk_record(disk)
    if ssh_key is None and record.get("class_name"):
        candidate = paths.ssh_key_path(record["class_name"])
        ssh_key = candidate if candidate.is_file() else None
    cfg = vm.VMConfig(disk=disk, accel=vm.Accel(accel), memory_mib=memory_mib, ssh_port=ssh_port,
                      ssh_key=ssh_key, snapshot=snapshot, workdir=workdir, ovmf_code=ovmf_code,
                      ovmf_vars=ovmf_vars, tpm=tpm)
    say = err_console.print
    with vm.start_vm(cfg) as machine:
        if machine.accel_note:
            say(machine.accel_note, markup=False)
        say(f"QEMU ({machine.accel.value}) started; console log {machine.paths.console}", markup=False)
        if ssh_key is not None:
            say(f"ssh -i {ssh_key} -p {machine.ssh_port} -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null root@127.0.0.1", markup=False)
        if check:
            arch = machine.config.architecture or vm.finalize_disk_architecture(disk)
            seconds = machine.wait_for_healthy(timeout or vm.finalize_boot_timeout(arch))
            console.print(f"healthy: the golden inference check passed {seconds:.1f} s after QEMU started "
                          f"({machine.accel.value})", markup=False)
            machine.poweroff()
            return
        follow_console(machine)


def follow_console(machine: vm.VM) -> None:
    """Copy the console to stdout until QEMU exits; the first Ctrl-C powers off, the second kills."""
    shown = 0
    try:
        while machine.running:
            shown = _show_new(machine, shown)
            time.sleep(0.2)
    except KeyboardInterrupt:
        err_console.print("kiln: powering off (Ctrl-C again to kill)", markup=False)
        try:
            machine.poweroff(timeout=120)
        except KeyboardInterrupt:
            machine.kill()
    _show_new(machine, shown)


def _show_new(machine: vm.VM, shown: int) -> int:
    try:
        data = machine.paths.console.read_bytes()
    except FileNotFoundError:
        return shown
    if len(data) > shown:
        sys.stdout.buffer.write(data[shown:])
        sys.stdout.flush()
    return len(data)
