"""The driver pin is checked against the base mirror's Packages indexes (fetches replaced by a fake
index), and the runtime's extras reach the wheel set."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.base import mirrors, pins
from builder.base.wheels import finalize_target
from builder.core.errors import SpecError
from builder.spec.loader import load_class

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "images/factory-gateway-gpu.yaml"
PACKAGES = ("libcuda1", "libnvidia-ml1", "nvidia-smi", "nvidia-kernel-support", "firmware-nvidia-gsp",
            "nvidia-kernel-dkms")


def fake_index(versions: dict[str, tuple[str, ...]]):  # type: ignore[no-untyped-def]
    def fetch(url: str) -> str:
        suite = url.split("/dists/")[1].split("/")[0]
        if "non-free/" not in url and "non-free-firmware/" not in url:
            return "Package: bash\nVersion: 5.2.15-2+b7\n\n"
        return "".join(f"Package: {p}\nVersion: {v}\n\n" for p in PACKAGES for v in versions.get(suite, ()))
    return fetch


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(mirrors, "reachable", lambda url, timeout=0: "snapshot" not in url)
    return load_class("factory-gateway-gpu", ROOT / "images")


def test_served_pin_passes(gpu, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(mirrors, "fetch_index", fake_index({"bookworm": ("535.261.03-1",),
                                                            "bookworm-security": ("535.309.01-0+deb12u1",)}))
    pins.check_driver_pins(gpu, SOURCE, pins.spec_lines(SOURCE))


def test_unserved_pin_is_a_located_error_naming_what_is_served(gpu, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(mirrors, "fetch_index", fake_index({"bookworm": ("535.261.03-1",),
                                                            "bookworm-security": ("535.320.01-0+deb12u1",)}))
    with pytest.raises(SpecError) as info:
        pins.check_driver_pins(gpu, SOURCE, pins.spec_lines(SOURCE))
    text = str(info.value)
    assert len(info.value.problems) == len(PACKAGES)
    line = next(i for i, ln in enumerate((ROOT / SOURCE).read_text().splitlines(), 1)
                if ln.strip() == "version: 535.309.01-0+deb12u1")
    assert (f"images/factory-gateway-gpu.yaml:{line}: spec.accelerator.driver.version: libcuda1=535.309.01-0+deb12u1 "
            "is not served by http://deb.debian.org/debian (bookworm, bookworm-updates, bookworm-security;") in text
    assert "it serves 535.320.01-0+deb12u1, 535.261.03-1" in text


def test_suites_follow_the_base_mirror(gpu) -> None:  # type: ignore[no-untyped-def]
    fallback = mirrors.finalize_base_mirror(gpu)
    assert mirrors.finalize_suites("bookworm", fallback) == [
        ("http://deb.debian.org/debian", "bookworm"), ("http://deb.debian.org/debian", "bookworm-updates"),
        ("http://deb.debian.org/debian-security", "bookworm-security")]
    pinned = mirrors.finalize_base_mirror(gpu, probe=False)
    assert mirrors.finalize_suites("bookworm", pinned)[2] == (
        "http://snapshot.debian.org/archive/debian-security/20261101T000000Z", "bookworm-security")


def test_extras_are_in_the_wheel_set_and_pins_check_the_runtime() -> None:
    hc = load_class("factory-gateway-gpu", ROOT / "images")
    target = finalize_target(hc)
    assert target.requirements[0] == "onnxruntime-gpu[cuda,cudnn]==1.26.0"
    assert next((p.name, p.version, p.loc) for p in pins.finalize_pins(hc, target)) == (
        "onnxruntime-gpu", "1.26.0", ("spec", "runtime", "version"))
