"""Read-only claims about a device, shown on one booted VM (shared boot)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from builder.disk import vm
from tests.vm.conftest import BOOT_TIMEOUT, BuiltDisk

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


def efi_var(host: Any, name: str) -> str:
    """A systemd-boot EFI variable as text (4 attribute bytes, then UTF-16LE)."""
    out = host.check_output(f"base64 -w0 /sys/firmware/efi/efivars/{name}-{LOADER_GUID}")
    import base64

    return base64.b64decode(out)[4:].decode("utf-16-le").rstrip("\0")


def test_root_is_the_signed_list_of_erofs_layers_and_read_only(host: Any) -> None:
    """Verified boot: / is the overlay of the layers /run/kiln/slot-layers names, each an erofs with
    fs-verity on, over an empty bottom (the slot's own filesystem is not part of the root); the list's
    sha256 is the digest in the UKI's signed command line."""
    root = host.mount_point("/")
    assert root.filesystem == "overlay" and "ro" in root.options
    lower = next(o for o in root.options if o.startswith("lowerdir=")).removeprefix("lowerdir=").split(":")
    assert lower[-1] == "/run/kiln/empty" and host.check_output("ls -A /run/kiln/empty") == ""
    listed = host.file("/run/kiln/slot-layers").content_string.split("\n")
    layers = [line.split() for line in listed if line.strip()]
    assert len(lower) == len(layers) + 1
    for n, (diff_id, digest) in enumerate(layers):
        assert host.mount_point(f"/run/kiln/layers/{n}").filesystem == "erofs"
        measured = host.check_output(f"fsverity measure /run/kiln/data/layers/{diff_id}.erofs").split()[0]
        assert measured == digest  # the kernel's digest: verity is on, every read is checked
    cmdline = host.file("/proc/cmdline").content_string.split()
    bound = next(w for w in cmdline if w.startswith("kiln.layers=")).removeprefix("kiln.layers=")
    assert bound == "sha256:" + host.check_output("sha256sum /run/kiln/slot-layers").split()[0]


def test_secure_boot_is_enforcing_with_kilns_keys(host: Any) -> None:
    """The firmware booted the signed systemd-boot and UKI with Secure Boot on (user mode, Kiln's PK), and
    the kernel knows it (lockdown)."""
    status = host.check_output("bootctl status --no-pager")
    assert "Secure Boot: enabled" in status, status
    assert "Kiln development Secure Boot db" in host.check_output("journalctl -k -b --no-pager -g 'X.509 cert'")
    assert "[integrity]" in host.check_output("cat /sys/kernel/security/lockdown")


def test_etc_and_var_are_overlays_on_data(host: Any) -> None:
    for d in ("etc", "var"):
        m = host.mount_point(f"/{d}")
        assert m.filesystem == "overlay", m
        assert f"upperdir=/run/kiln/data/overlay/{d}/upper" in ",".join(m.options)
    source = host.check_output("findmnt -n -o SOURCE /run/kiln/data")
    assert host.check_output(f"lsblk -n -o PARTLABEL {source}").strip() == "data"
    assert host.mount_point("/run/kiln/data").filesystem == "ext4"


def test_writing_under_usr_fails(host: Any) -> None:
    r = host.run("touch /usr/kiln-test")
    assert r.rc != 0 and "Read-only file system" in r.stderr


def test_tmp_and_etc_are_writable(host: Any) -> None:
    assert host.run("touch /tmp/kiln-test /etc/kiln-test-ro-check && rm /etc/kiln-test-ro-check").rc == 0
    assert host.mount_point("/tmp").filesystem == "tmpfs"


def test_release_json_shows_the_build(host: Any, qemu_disk: BuiltDisk) -> None:
    release = json.loads(host.file("/usr/lib/kiln/release.json").content_string)
    assert release["class"] == qemu_disk.class_name
    assert release["version"] == qemu_disk.version


def test_machine_id_is_made_on_first_boot(host: Any) -> None:
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert len(machine_id) == 32  # the image ships it empty


def test_inference_service_is_active(booted: vm.VM, host: Any) -> None:
    # SSH comes up before the service has finished starting (a busy TCG guest): wait for the
    # golden check, which needs the service, then ask
    booted.wait_for_healthy(BOOT_TIMEOUT)
    assert host.service("kiln-inference.service").is_running


def test_golden_health_check_passes(booted: vm.VM, host: Any) -> None:
    """The golden set replayed on the device, in process and through the service, within the envelope."""
    booted.wait_for_healthy(BOOT_TIMEOUT)  # the boot's own run of the check
    r = host.run("/usr/libexec/kiln/kiln-health-inference --service http://127.0.0.1:8470 --wait 60 "
                 "--json --output /tmp/health.json")
    assert r.rc == 0, r.stdout + r.stderr
    (digits,) = json.loads(r.stdout)["models"]
    assert digits["name"] == "digits" and digits["local"]["ok"] and digits["service"]["ok"], digits
    assert digits["local"]["max_abs_diff"] <= digits["local"]["tolerance"]
    assert digits["latency"]["p95_ms"] <= digits["latency"]["envelope_p95_ms"]
    print(f"digits on the guest: {digits['latency']}")


def test_booted_entry_is_slot_a(host: Any, qemu_disk: BuiltDisk) -> None:
    cmdline = host.file("/proc/cmdline").content_string.split()
    assert "kiln.slot=a" in cmdline
    assert "root=PARTLABEL=root-a" in cmdline  # the UKI's: the same signed image boots on every disk
    assert efi_var(host, "LoaderEntrySelected") == f"kiln-{qemu_disk.version}-a.efi"
    status = host.check_output("bootctl status --no-pager")
    assert f"kiln-{qemu_disk.version}-a.efi" in status


def test_kernel_command_line_has_the_class_kargs(host: Any, qemu_class_args: tuple[str, ...]) -> None:
    cmdline = host.file("/proc/cmdline").content_string.split()
    for arg in qemu_class_args:
        assert arg in cmdline
    assert {"ro", "rootfstype=erofs"} <= set(cmdline)


def test_esp_is_mounted_from_the_booted_disk_on_demand_only(host: Any) -> None:
    """Kiln's efi.mount, started by the units that need /efi (RequiresMountsFor=). No automount:
    systemd-gpt-auto-generator is masked in the image, because its efi.automount unmounted the ESP
    after two idle minutes, and that stopped kiln-agent.service in the middle of an update (found by
    the accel tier, tests/accel/test_accel_fail_policy.py)."""
    assert host.run("systemctl cat efi.automount").rc != 0, "an automount for /efi exists"
    assert not host.file("/run/systemd/generator/efi.automount").exists
    host.run_expect([0], "systemctl start efi.mount")
    esp = host.check_output("bootctl --print-esp-path").strip()
    assert esp == "/efi"
    # Kiln's unit, not one the generator wrote over it in /run/systemd/generator.
    fragment = host.check_output("systemctl show -P FragmentPath efi.mount").strip()
    assert fragment.endswith("/lib/systemd/system/efi.mount") and not fragment.startswith("/run/"), fragment
    assert "kiln" in host.check_output("bootctl list --no-pager")
    assert host.file(f"{esp}/loader/loader.conf").contains("^default kiln-\\*$")


@pytest.mark.parametrize("unit", ["kiln-inference.service", "ssh.service"])
def test_no_unit_needs_a_writable_usr(host: Any, unit: str) -> None:
    journal = host.check_output(f"journalctl -b -u {unit} --no-pager")
    assert "Read-only file system" not in journal


def test_no_ext4_scrubbing_at_boot(host: Any) -> None:
    """e2fsprogs' e2scrub (ext4 on LVM snapshots; a device has no LVM) is off by Kiln's preset: at boot it
    took 20 s of CPU beside the inference service's load (bench.boot, issue 18)."""
    for unit in ("e2scrub_reap.service", "e2scrub_all.timer"):
        assert host.run(f"systemctl is-enabled {unit}").stdout.strip() == "disabled", unit
    assert host.run("systemctl show -p ActiveEnterTimestampMonotonic --value e2scrub_reap.service").stdout.strip() \
        == "0"


def test_the_boot_neither_waits_for_the_esp_nor_times_the_model_beside_its_load(booted: vm.VM, host: Any) -> None:
    """Two orderings that cut the boot (bench.boot, issue 18). efi.mount is not part of local-fs.target
    (udev finding the ESP held the whole boot about 5 s), yet the units that need /efi got it. The golden
    check starts beside the service, not after it, and times the model only once the service answered."""
    booted.wait_for_healthy(BOOT_TIMEOUT)
    assert "local-fs.target" not in host.check_output("systemctl show -P Before efi.mount").split()
    assert host.check_output("systemctl show -P ActiveState kiln-health-agent.service").strip() == "active"
    assert host.check_output("findmnt -n -o FSTYPE /efi").strip() == "vfat"
    assert "kiln-inference.service" not in host.check_output(
        "systemctl show -P After kiln-health-inference.service").split()

    def at(unit: str, prop: str) -> datetime:
        shown = host.check_output(f"systemctl show -P {prop} --timestamp=us+utc {unit}").strip()
        return datetime.strptime(shown, "%a %Y-%m-%d %H:%M:%S.%f UTC").replace(tzinfo=UTC)

    ready = at("kiln-inference.service", "ActiveEnterTimestamp")
    assert at("kiln-health-inference.service", "ExecMainStartTimestamp") < ready  # started beside it
    (digits,) = json.loads(host.check_output("cat /var/lib/kiln/health/inference.json"))["models"]
    timed = datetime.fromisoformat(digits["latency"]["started_at"].replace("Z", "+00:00"))
    assert timed >= ready - timedelta(seconds=1)  # the check may see /healthz answer just before READY=1
