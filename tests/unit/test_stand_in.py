"""A vendor class's stand-in (builder.spec.stand_in): jetson-vision-standard without NVIDIA's L4T, for QEMU.

The class itself is refused here with every missing piece named; its stand-in takes the base, kernel,
runtime and packages from spec.standIn and everything else from the class; a broken standIn is
located in the class's file; a class without one has no stand-in. The stand-in's build, boot and
degraded mode on arm64 are tests/vm/test_arm64.py's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.base.capability import why_not_buildable
from builder.base.emulation import why_not_emulated
from builder.cli import main
from builder.core.errors import SpecError
from builder.image.render import finalize_plan
from builder.spec.loader import known_classes, load_class
from builder.spec.schema import AcceleratorKind, Architecture, BootControl, FallbackPolicy, Family, RuntimeName
from kiln_device import contract
from tests.conftest import ROOT

JETSON = "jetson-vision-standard"
STAND_IN = f"{JETSON}-stand-in"


def test_the_stand_in_is_the_class_with_standin_s_base_kernel_and_cpu_runtime() -> None:
    cls, hc = load_class(JETSON, ROOT / "images"), load_class(STAND_IN, ROOT / "images")
    assert (hc.name, hc.stand_in_for, hc.file_name) == (STAND_IN, JETSON, f"{JETSON}.yaml")
    assert cls.stand_in_for is None and cls.file_name == f"{JETSON}.yaml"
    s = hc.spec
    # a device of the class (compatible acme-robotics,jetson-vision-standard,orin) never takes it,
    # and a production device refuses a development image
    assert s.compatible == f"acme-robotics,{STAND_IN}" and s.compatible != cls.spec.compatible
    assert s.development and s.access.ssh
    assert s.architecture is Architecture.aarch64
    assert s.boot_control is BootControl.systemd_boot and cls.spec.boot_control is BootControl.nvbootctrl
    assert (s.base.family, s.base.release) == (Family.debian, "bookworm")
    assert s.kernel.package == "linux-image-arm64" and "console=ttyAMA0,115200n8" in s.kernel.args
    assert s.repositories == ()
    assert "openssh-server" in s.packages
    # the CPU runtime, asked for the class's own providers: the device finds TensorRT missing
    assert (s.runtime.name, s.runtime.version, s.runtime.index) == (RuntimeName.onnxruntime, "1.20.0", None)
    assert s.runtime.execution_providers == cls.spec.runtime.execution_providers
    assert s.runtime.execution_providers[0] == "TensorrtExecutionProvider"
    # the accelerator's kind and policy are the class's; its driver and toolkit are the BSP's
    assert s.accelerator.kind is AcceleratorKind.nvidia_jetson
    assert s.accelerator.fallback is not None and s.accelerator.fallback.policy is FallbackPolicy.fail
    assert s.accelerator.driver is None and s.accelerator.toolkit is None
    assert (s.models, s.rollout, s.envelope, s.disk) == (cls.spec.models, cls.spec.rollout, cls.spec.envelope,
                                                         cls.spec.disk)
    assert s.stand_in is None


def test_the_stand_in_is_listed_after_its_class_and_validates() -> None:
    names = known_classes(ROOT / "images")
    assert names[names.index(JETSON) + 1] == STAND_IN
    assert "qemu-x86_64-stand-in" not in names
    result = CliRunner().invoke(main, ["validate", JETSON, STAND_IN])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["ok", JETSON, "ok", STAND_IN]


def test_the_class_is_refused_naming_every_bsp_piece_and_its_stand_in_is_not() -> None:
    reasons = why_not_buildable(load_class(JETSON, ROOT / "images"), probe_network=False, tools=False)
    text = "\n".join(reasons)
    assert "a l4t base: Kiln bootstraps Debian bases only (jammy would come from http://snapshot.ubuntu.com" in text
    assert "boot control nvbootctrl" in text
    emulation = why_not_emulated(Architecture.aarch64)
    stand_in = why_not_buildable(load_class(STAND_IN, ROOT / "images"), probe_network=False, tools=False)
    if emulation is None:
        assert reasons[-1] == f"{STAND_IN} builds the rest of the class here, for QEMU (spec.standIn)"
        assert stand_in == []
    else:  # this host cannot run arm64 programs: both say so, and nothing points at a stand-in it cannot build
        assert emulation in reasons and stand_in == [emulation]
        assert STAND_IN not in text


def test_the_stand_in_s_release_asks_for_tensorrt_under_policy_fail_and_boots_with_systemd_boot() -> None:
    plan = finalize_plan(load_class(STAND_IN, ROOT / "images"), source=f"images/{JETSON}.yaml",
                         version="1.2.3", revision="0123abc")
    release = contract.release_json(plan.release)
    assert release["class"] == STAND_IN and release["compatible"] == f"acme-robotics,{STAND_IN}"
    assert release["accelerator"] == "nvidia-jetson" and release["driverVersion"] is None
    assert release["fallback"]["policy"] == "fail"
    assert release["runtime"]["executionProviders"][0] == "TensorrtExecutionProvider"
    assert release["development"] is True
    assert release["bootControl"] == "systemd-boot"
    assert dict(plan.labels)["org.opencontainers.image.source"] == f"images/{JETSON}.yaml"


def test_a_class_without_standin_has_no_stand_in() -> None:
    with pytest.raises(SpecError, match=r"qemu-x86_64 has no spec.standIn, so there is no qemu-x86_64-stand-in"):
        load_class("qemu-x86_64-stand-in", ROOT / "images")
    result = CliRunner().invoke(main, ["build", "qemu-x86_64-stand-in"])
    assert result.exit_code == SpecError.exit_code and "Traceback" not in result.output, result.output
    with pytest.raises(SpecError, match=r"no hardware class named 'nope-stand-in'"):
        load_class("nope-stand-in", ROOT / "images")


def _project(tmp_path: Path, old: str, new: str) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "images/_defaults.yaml", images)
    text = (ROOT / f"images/{JETSON}.yaml").read_text()
    assert old in text
    (images / f"{JETSON}.yaml").write_text(text.replace(old, new, 1))
    return images


def test_a_broken_standin_is_located_in_the_class_file(tmp_path: Path) -> None:
    images = _project(tmp_path, 'runtime: {name: onnxruntime, version: "1.20.0"}',
                      'runtime: {name: onnxruntime-gpu, version: "1.20.0"}')
    load_class(JETSON, images)  # the class itself is fine
    with pytest.raises(SpecError) as exc:
        load_class(STAND_IN, images)
    lines = (images / f"{JETSON}.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines, 1) if "name: onnxruntime-gpu, version" in line)
    assert exc.value.problems == [
        f"{images / JETSON}.yaml:{at}: spec.standIn.runtime.name: {STAND_IN}: "
        "a stand-in's runtime is onnxruntime, the CPU build from PyPI"]


def test_an_unknown_standin_key_fails_the_class_itself(tmp_path: Path) -> None:
    images = _project(tmp_path, "    packages: [python3, python3-venv, chrony, openssh",
                      "    pakages: [python3, python3-venv, chrony, openssh")
    with pytest.raises(SpecError, match=r"spec.standIn.pakages: unknown key"):
        load_class(JETSON, images)
    with pytest.raises(SpecError, match=r"spec.standIn.pakages: unknown key"):
        load_class(STAND_IN, images)


def test_list_json_says_which_is_buildable() -> None:
    result = CliRunner().invoke(main, ["list", "--json", "--no-probe"])
    assert result.exit_code == 0, result.output
    rows = {r["class"]: r for r in json.loads(result.output)}
    assert rows[STAND_IN]["runtime"] == "onnxruntime 1.20.0"
    assert rows[STAND_IN]["accelerator"] == "nvidia-jetson"
    assert any("nvbootctrl" in why for why in rows[JETSON]["whyNotBuildable"])
