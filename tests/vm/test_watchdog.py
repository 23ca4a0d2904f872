"""Destructive, one device (a fresh disk copy, a fresh QEMU per boot, the same EFI variables):

1. a device whose system hangs is reset by its hardware watchdog and boots again, and what it
   wrote to /etc and /var before the hang is still there (the overlays on the data partition);
2. a factory reset wipes them: the flag set from the host on the powered-off disk, and the same
   flag set by the device itself before a reboot.

The hang: with real-time throttling off, one SCHED_FIFO busy loop per CPU starves
everything else, systemd included, so nothing pings the watchdog (iTCO on QEMU's q35,
armed by systemd with RuntimeWatchdogSec, overlays/common/.../60-kiln-watchdog.conf).
Nothing in the guest shuts down or panics: only the watchdog can end that boot, and with
-no-reboot its reset ends QEMU.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from builder.disk import rawdisk, vm
from tests.vm.conftest import BOOT_TIMEOUT, BuiltDisk, copy_disk

pytestmark = pytest.mark.vmlong  # scripts/test-vmlong: too long for CI's 60 minutes under TCG

HANG = ("sysctl -q kernel.sched_rt_runtime_us=-1; "
        "for i in $(seq $(nproc)); do chrt -f 99 sh -c 'while :; do :; done' & done; wait")
MARKS = "/etc/kiln-test /var/lib/kiln-test"


def test_hung_device_is_reset_by_the_watchdog_and_keeps_its_state_until_a_factory_reset(
        qemu_disk: BuiltDisk, tmp_path: Path) -> None:
    image = copy_disk(qemu_disk.path, tmp_path / "disk.raw")
    cfg = vm.VMConfig(disk=image, ssh_key=qemu_disk.ssh_key, workdir=tmp_path / "vm", no_reboot=True)
    with vm.start_vm(cfg) as machine:
        machine.wait_for_healthy(BOOT_TIMEOUT)
        wd = machine.ssh("cd /sys/class/watchdog/watchdog0 && cat identity state timeout").stdout.split()
        assert wd == ["iTCO_wdt", "active", "60"], wd
        machine.ssh("echo kept > /etc/kiln-test && echo kept > /var/lib/kiln-test && sync")
        before = len(machine.console_text())
        machine.ssh(f"cat > /run/kiln-test-hang <<'EOF'\n{HANG}\nEOF")
        # a timer, so the command returns before the CPUs are taken
        machine.ssh("systemd-run --quiet --on-active=2 --unit kiln-test-hang sh /run/kiln-test-hang")
        machine.close_ssh()
        hung = time.monotonic()
        assert machine.wait_exit(600) == 0  # the watchdog's reset; -no-reboot turns it into an exit
        after = machine.console_text()[before:]
        seconds = time.monotonic() - hung
    for orderly in ("reboot: ", "Kernel panic", "systemd-shutdown"):
        assert orderly not in after, (orderly, seconds, after[-2000:])
    assert seconds > 25, seconds  # 60 s without a ping (the last one up to 30 s before the hang)
    with vm.start_vm(cfg) as machine:
        machine.wait_for_healthy(BOOT_TIMEOUT)
        assert "kiln.slot=a" in machine.ssh("cat /proc/cmdline").stdout
        assert machine.ssh(f"cat {MARKS}").stdout == "kept\nkept\n"  # the same device, its /etc and /var
        machine.poweroff()
    rawdisk.make_factory_reset(image)  # from the host, the disk powered off
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        r = machine.ssh(f"ls {MARKS}", check=False)
        assert r.exit_status != 0 and "No such file" in r.stderr
        # the flag consumed; the layer store kept (a slot made of layers boots from it)
        assert machine.ssh("ls /run/kiln/data").stdout.split() == ["layers", "lost+found", "overlay"]
        assert machine.ssh("ls /run/kiln/data/layers | grep -c '[.]erofs$'").stdout.strip() != "0"
        # In the device: the same flag, then a reboot.
        machine.ssh("echo again > /etc/kiln-test && touch /run/kiln/data/factory-reset && sync")
        machine.poweroff()
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        assert not machine.ssh("test -e /etc/kiln-test", check=False).ok
        machine.poweroff()
