"""Destructive: /etc survives a reboot; a factory reset wipes it (a fresh disk copy, fresh QEMU per boot)."""

from __future__ import annotations

from pathlib import Path

from builder import disk, vm
from tests.vm.conftest import BOOT_TIMEOUT, BuiltDisk, copy_disk


def boot(image: Path, key: Path, workdir: Path) -> vm.VMConfig:
    # The same workdir each boot: the same EFI variables, like one device.
    return vm.VMConfig(disk=image, ssh_key=key, workdir=workdir, no_reboot=True)


def test_etc_persists_until_factory_reset(qemu_disk: BuiltDisk, tmp_path: Path) -> None:
    image = copy_disk(qemu_disk.path, tmp_path / "disk.raw")
    cfg = boot(image, qemu_disk.ssh_key, tmp_path / "vm")
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        machine.ssh("echo kept > /etc/kiln-test && echo kept > /var/lib/kiln-test && sync")
        machine.poweroff()
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        assert machine.ssh("cat /etc/kiln-test /var/lib/kiln-test").stdout == "kept\nkept\n"
        machine.poweroff()
    disk.make_factory_reset(image)  # from the host, the disk powered off
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        r = machine.ssh("ls /etc/kiln-test /var/lib/kiln-test", check=False)
        assert r.exit_status != 0 and "No such file" in r.stderr
        assert machine.ssh("ls /run/kiln/data").stdout.split() == ["lost+found", "overlay"]  # flag consumed
        # In the device: the same flag, then a reboot.
        machine.ssh("echo again > /etc/kiln-test && touch /run/kiln/data/factory-reset && sync")
        machine.poweroff()
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        assert not machine.ssh("test -e /etc/kiln-test", check=False).ok
        machine.poweroff()
