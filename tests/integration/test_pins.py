"""Every class's runtime pin and wheel set resolve on its index, and a bad pin is refused in seconds.

These ask the real index (PyPI, reachable from the build machine and CI); the Jetson class names
NVIDIA's Jetson index, which this network cannot reach: its build is refused earlier anyway (aarch64).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from builder.base import pins
from builder.base.wheels import finalize_target
from builder.core.errors import BuildError, SpecError
from builder.spec.loader import known_classes, load_class
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

VENDOR_INDEX = {"jetson-vision-standard"}  # an index this network cannot reach (checked where it can)
PYPI_CLASSES = [c for c in known_classes(ROOT / "images") if c not in VENDOR_INDEX]


@pytest.mark.parametrize("name", PYPI_CLASSES)
def test_every_pin_of_the_class_is_published_for_its_image(name: str) -> None:
    hc = load_class(name, ROOT / "images")
    target = finalize_target(hc)
    assert target.index in (None, pins.PYPI), f"{name} now uses another index: move it to VENDOR_INDEX"
    pins.check_pins(hc, f"images/{name}.yaml")  # raises with the nearest versions when not


def test_vendor_index_classes_say_which_index() -> None:
    for name in VENDOR_INDEX:
        hc = load_class(name, ROOT / "images")
        assert hc.spec.runtime.index and not hc.spec.runtime.index.startswith(pins.PYPI)
        with pytest.raises(BuildError, match="the index is unreachable"):
            pins.check_pins(hc, f"images/{name}.yaml")


def test_an_unpublished_pin_names_file_line_and_the_nearest_versions() -> None:
    """The finding: factory-gateway-gpu pinned onnxruntime-gpu 1.32.0, which PyPI never published."""
    hc = load_class("factory-gateway-gpu", ROOT / "images")
    bad = hc.model_copy(update={"spec": hc.spec.model_copy(update={
        "runtime": hc.spec.runtime.model_copy(update={"version": "1.32.0"})})})
    source = "images/factory-gateway-gpu.yaml"
    with pytest.raises(SpecError) as info:
        pins.check_pins(bad, source, pins.spec_lines(source))
    text = str(info.value)
    line = next(i for i, ln in enumerate((ROOT / source).read_text().splitlines(), 1)
                if ln.strip().startswith("version:") and "1.26" in ln)
    assert f"{source}:{line}: spec.runtime.version: onnxruntime-gpu==1.32.0 is not published on" in text
    assert "for Python 3.11 manylinux_2_36_x86_64 (nearest published: 1.31.1, 1.31.0" in text


def test_kiln_build_refuses_a_bad_pin_in_seconds(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "images/qemu-x86_64.yaml").read_text())
    doc["spec"]["runtime"] = {"version": "1.99.0"}
    spec = tmp_path / "qemu-x86_64.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / "_defaults.yaml").write_text((ROOT / "images/_defaults.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k != "KILN_QUIET"}  # the step log shows what ran
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "builder.cli", "build", str(spec), "--version", "0.0.1-badpin"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    elapsed = time.monotonic() - started
    assert r.returncode == 2, r.stderr
    assert "spec.runtime.version: onnxruntime==1.99.0 is not published on https://pypi.org/simple" in r.stderr
    assert "nearest published: " in r.stderr and "Traceback" not in r.stderr
    assert f"{spec}:" in r.stderr  # located in the class file
    assert elapsed < 60, f"refused after {elapsed:.0f} s"
    assert "==> the runtime's wheels" in r.stderr and "==> offline base" not in r.stderr  # nothing slow ran first
    assert not (ROOT / "build/qemu-x86_64/0.0.1-badpin/build.json").exists()


def test_gpu_driver_pin_is_served_by_the_base_mirror() -> None:
    """The Debian mirror (the fallback here: snapshot.debian.org is out of reach) serves the pinned driver
    for every package of the image and of the modules stage; an unserved pin is a located spec error."""
    hc = load_class("factory-gateway-gpu", ROOT / "images")
    source = "images/factory-gateway-gpu.yaml"
    pins.check_driver_pins(hc, source, pins.spec_lines(source))
    bad = hc.model_copy(update={"spec": hc.spec.model_copy(update={"accelerator": hc.spec.accelerator.model_copy(
        update={"driver": hc.spec.accelerator.driver.model_copy(update={"version": "535.247.01"})})})})  # type: ignore[union-attr]
    with pytest.raises(SpecError) as info:
        pins.check_driver_pins(bad, source, pins.spec_lines(source))
    assert "spec.accelerator.driver.version: libcuda1=535.247.01 is not served by" in str(info.value)
    assert "it serves 535.309.01-0+deb12u1" in str(info.value)
