"""bench.boot's reading of systemd's timestamps (builder.disk.timeline)."""

from __future__ import annotations

import pytest

from builder.disk.timeline import monotonic_s, show_props

pytestmark = pytest.mark.unit


def test_systemctl_show_properties_in_seconds() -> None:
    # `systemctl show -p ...` as a booted qemu-x86_64 guest printed it (bench.boot, 2026-12-03)
    props = show_props("InactiveExitTimestampMonotonic=18215441\nActiveEnterTimestampMonotonic=48204338\n"
                       "InitRDTimestampMonotonic=0\n")
    assert monotonic_s(props["InactiveExitTimestampMonotonic"]) == 18.2
    assert monotonic_s(props["ActiveEnterTimestampMonotonic"]) == 48.2
    # 0: it never happened (no initramfs timestamp on this boot; a unit never active)
    assert monotonic_s(props["InitRDTimestampMonotonic"]) is None
    assert monotonic_s(props.get("FinishTimestampMonotonic")) is None
    assert monotonic_s("n/a") is None
