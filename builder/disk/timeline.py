"""Where a booted guest's seconds went, from systemd's own monotonic timestamps (bench.boot)."""

from __future__ import annotations

from typing import Any

from builder.disk.vm import HEALTH_UNIT, VM

# Units whose start and finish `boot_timeline` reports: the health gate and what it waits for.
TIMELINE_UNITS = ("kiln-inference.service", HEALTH_UNIT, "kiln-health-agent.service", "kiln-agent-boot.service",
                  "kiln-ssh-keygen.service", "boot-complete.target")


def boot_timeline(machine: VM, units: tuple[str, ...] = TIMELINE_UNITS) -> dict[str, Any]:
    """Seconds since the kernel started: the initramfs, the switch to the real root, basic.target, and
    when each of `units` started and became active (through the guest agent); plus `systemd-analyze
    blame`'s slowest ten units ([] until systemd has finished the boot)."""
    props = ("FirmwareTimestampMonotonic", "LoaderTimestampMonotonic", "InitRDTimestampMonotonic",
             "UserspaceTimestampMonotonic", "FinishTimestampMonotonic")
    manager = show_props(machine.guest_exec(f"systemctl show -p {','.join(props)}", timeout=60).stdout)
    out: dict[str, Any] = {
        # Before the kernel (systemd-boot's EFI variables): firmware and loader started that long before it.
        "firmware_s": monotonic_s(manager.get("FirmwareTimestampMonotonic")),
        "loader_s": monotonic_s(manager.get("LoaderTimestampMonotonic")),
        "initrd_s": monotonic_s(manager.get("InitRDTimestampMonotonic")),
        "userspace_s": monotonic_s(manager.get("UserspaceTimestampMonotonic")),
        "finished_s": monotonic_s(manager.get("FinishTimestampMonotonic")),
        "units": {},
    }
    for unit in ("basic.target", *units):
        got = show_props(machine.guest_exec(
            f"systemctl show -p InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic {unit}",
            check=False, timeout=60).stdout)
        out["units"][unit] = {"started_s": monotonic_s(got.get("InactiveExitTimestampMonotonic")),
                              "active_s": monotonic_s(got.get("ActiveEnterTimestampMonotonic"))}
    blame = machine.guest_exec("systemd-analyze blame --no-pager", check=False, timeout=60).stdout
    out["blame"] = [line.strip() for line in blame.splitlines() if line.strip()][:10]
    return out


def show_props(text: str) -> dict[str, str]:
    """`systemctl show -p A,B` output (A=1\\nB=2) as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def monotonic_s(value: str | None) -> float | None:
    """A `...TimestampMonotonic` property (microseconds; 0 when it never happened) in seconds."""
    if not value or not value.strip().isdigit() or int(value) == 0:
        return None
    return round(int(value) / 1e6, 1)
