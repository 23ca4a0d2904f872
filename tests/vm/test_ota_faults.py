"""End to end on one fresh device: an update through everything that goes wrong in the field.

The device (a fresh copy of the v1 disk, slot A) pulls a release with a 40 MiB layer through a
link the test controls (tests/netfault.py FaultyLink, 2 MiB/s when slowed). In order:

1. the registry goes away mid-download: the agent stops with exit 7 and says so in `status`;
2. the power goes out mid-download (QEMU killed): the device boots slot A, healthy;
3. the data partition is full: exit 8 with what is free; the half-unpacked update is removed;
4. the power goes out right after a refresh of the channel's TUF metadata, before it was fsynced:
   the next boot's agent still trusts its metadata (or fetches it again) and goes on;
5. the power goes out half way through writing slot B: slot A boots, the torn slot is untrusted;
6. the power goes out right after the boot entry was renamed into place: the next boot is the
   trial of the new slot, which passes its checks and is blessed: the update completes.

Slot A's bytes are the same at the end as at the start.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from builder.disk import vm
from tests.netfault import FaultyLink
from tests.vm.conftest import BOOT_TIMEOUT, BuiltDisk, copy_disk
from tests.vm.otakit import LIST_ENTRIES, Releases, agent, configure, serving_releases, slot_digest, status

pytestmark = pytest.mark.vmlong  # scripts/test-vmlong: too long for CI's 60 minutes under TCG

MIB = 2**20
VERSION = "1.1.0"
CHANNEL = "faults"


@pytest.fixture(scope="module")
def releases(qemu_disk: BuiltDisk, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Releases]:
    with serving_releases(tmp_path_factory.mktemp("ota-faults")) as rel:
        yield rel


@pytest.fixture(scope="module")
def link(releases: Releases) -> Iterator[FaultyLink]:
    with FaultyLink(releases.registry.address) as faulty:
        yield faulty


def healthy_on(machine: vm.VM, slot: str, version: str) -> None:
    machine.wait_for_healthy(BOOT_TIMEOUT)
    machine.wait_for_ssh(BOOT_TIMEOUT)
    st = status(machine)
    assert (st["bootedSlot"], st["version"]) == (slot, version), st


def stop_at(machine: vm.VM, point: str, timeout: float = 1200) -> None:
    """Run `kiln-agent update` in the guest until it stops at POINT (KILN_AGENT_FAULT=stop:POINT)."""
    machine.ssh("rm -f /run/kiln-agent.fault && systemd-run --unit kiln-test-update --collect "
                f"--setenv=KILN_AGENT_FAULT=stop:{point} kiln-agent update --no-reboot")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = machine.ssh("cat /run/kiln-agent.fault 2>/dev/null; systemctl is-active kiln-test-update", check=False)
        if r.stdout.split()[:1] == [point]:
            return
        if "active" not in r.stdout.split():
            # the unit's last words (not its `+ command` lines) and the kernel's, which say why it ended
            log = machine.ssh("journalctl -b -u kiln-test-update --no-pager | grep -v 'kiln-agent: + ' | tail -n 25; "
                              "journalctl -b -k --no-pager | tail -n 15; df -m /var/lib/kiln /run/kiln/data; "
                              "ls -la /var/lib/kiln", check=False).stdout
            raise AssertionError(f"the update ended before {point}:\n{log}")
        time.sleep(2)
    raise AssertionError(f"the update did not reach {point} within {timeout:.0f} s")


def test_update_survives_lost_registry_full_disk_and_power_cuts(
        releases: Releases, link: FaultyLink, qemu_disk: BuiltDisk, tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.images import qemu_image

    v1 = qemu_image(releases.state)
    releases.release_derived(v1["image"]["ref"], VERSION, CHANNEL, payload_mib=40)
    tmp = tmp_path_factory.mktemp("faults-device")
    cfg = vm.VMConfig(disk=copy_disk(qemu_disk.path, tmp / "disk.raw"), ssh_key=qemu_disk.ssh_key,
                      workdir=tmp / "vm", no_reboot=True)

    with vm.start_vm(cfg) as machine:
        healthy_on(machine, "a", qemu_disk.version)
        configure(machine, releases, port=link.port, channel=CHANNEL)
        slot_a, entries = slot_digest(machine, "a"), machine.ssh(LIST_ENTRIES).stdout

        # 1. The registry goes away mid-download.
        link.restore(rate=2 * MIB)
        start = link.delivered
        with ThreadPoolExecutor(1) as pool:
            update = pool.submit(agent, machine, "update", "--no-reboot")
            link.wait_for(start + 8 * MIB)
            link.cut()
            lost = update.result(timeout=600)
        assert lost.exit_status == 7, lost.stdout
        assert "pulling" in lost.stdout and "Traceback" not in lost.stdout, lost.stdout
        st = status(machine)
        assert (st["lastResult"]["result"], st["lastResult"]["code"]) == ("failed", 7), st
        assert machine.ssh(LIST_ENTRIES).stdout == entries
        assert machine.ssh("systemctl is-active kiln-health-inference.service").stdout.strip() == "active"

        # 2. The power goes out mid-download.
        link.restore(rate=2 * MIB)
        start = link.delivered
        machine.ssh("systemd-run --unit kiln-test-update --collect kiln-agent update --no-reboot")
        link.wait_for(start + 8 * MIB)
        machine.kill()

    link.restore(rate=None)
    with vm.start_vm(cfg) as machine:
        healthy_on(machine, "a", qemu_disk.version)
        # 3. The data partition is full (70 MiB left to root, ext4's reserved blocks included: the
        # download of the 40 MiB layer fits, its unpacked files in the layer store do not).
        machine.ssh("set -- $(stat -f -c '%f %S' /var/lib/kiln); "
                    "fallocate -l $(($1 * $2 - 70 * 1024 * 1024)) /var/lib/kiln/filler")
        full = agent(machine, "update", "--no-reboot")
        assert full.exit_status == 8, full.stdout
        assert "MiB free after removing the unpacked update" in full.stdout, full.stdout
        assert "Traceback" not in full.stdout
        assert machine.ssh("ls /var/lib/kiln/work").stdout.split() == []
        # nothing half-built stays in the layer store: no work tree, no temporary layer file
        assert machine.ssh("ls -A /run/kiln/data/layers | grep -v '[.]erofs$' | grep -v '[.]verity$' || true"
                           ).stdout.split() == []
        assert "oci-put-blob" not in machine.ssh("ls /var/lib/kiln/oci").stdout  # the cut download's temp file
        st = status(machine)
        assert (st["lastResult"]["result"], st["lastResult"]["code"]) == ("failed", 8), st
        # synced: the power cut of step 4 comes within ext4's 5 s commit interval, and would bring it back
        machine.ssh("rm /var/lib/kiln/filler && sync")
        # 4. The power goes out right after the agent wrote fresh TUF metadata, before any fsync.
        releases.refresh_channel()
        stop_at(machine, "trust-refreshed")
        machine.kill()

    with vm.start_vm(cfg) as machine:
        healthy_on(machine, "a", qemu_disk.version)
        checked = agent(machine, "check")
        assert checked.exit_status == 0 and "Traceback" not in checked.stdout, checked.stdout
        assert status(machine)["trust"]["status"] == "fresh"
        # 5. The power goes out half way through writing slot B.
        stop_at(machine, "writing")
        machine.kill()

    with vm.start_vm(cfg) as machine:
        healthy_on(machine, "a", qemu_disk.version)
        st = status(machine)
        assert st["pending"]["phase"] == "built" and not st["slots"].get("b"), st
        assert not [e for e in st["entries"] if VERSION in e], st  # nothing boots the torn slot
        # 6. The power goes out right after the trial entry was renamed into place.
        stop_at(machine, "entry")
        machine.kill()

    with vm.start_vm(cfg) as machine:  # the trial boot of slot B: it passes and is blessed
        healthy_on(machine, "b", VERSION)
        machine.ssh("systemctl is-active --wait systemd-bless-boot.service || true", timeout=120)
        st = status(machine)
        assert st["lastResult"]["result"] == "success", st
        assert f"kiln-{VERSION}-b.efi" in st["entries"], st
        assert agent(machine, "update", "--no-reboot").exit_status == 2  # up to date
        assert slot_digest(machine, "a") == slot_a
        machine.poweroff()

