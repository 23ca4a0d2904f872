"""arm64 on this x86_64 host (container tier): the arm64-vision base bootstrapped through qemu-user,
reproducibly, with its kernel kept as an EFI image; and the model gate run on arm64 itself.

The gate's worker runs in an arm64 image of the class's base and runtime wheels, under qemu-user with
the CPU the device VM has (builder.base.emulation.EMULATED_CPU). Measured on the digits model: every
candidate's arm64 outputs agree with the x86_64 host's within the golden tolerance (int8-static
bit for bit, int8-dynamic within 1e-5), so the decision is the same on both ISAs for this model. The
same gate on QEMU's plain `max` CPU, which offers SME to programs, refuses int8-dynamic (accuracy
0.108 against 0.986 on the host): what ran on the target decides, and the host's figures stay in the
report as a reference only.
"""

from __future__ import annotations

import dataclasses
import struct
import tarfile
from pathlib import Path

import pytest

from builder.base.bootstrap import BaseImage, make_base_for_class
from builder.base.emulation import EMULATED_CPU, why_not_emulated
from builder.core.context import make_context
from builder.core.engine import PodmanEngine
from builder.core.state import StateDir
from builder.model.for_class import finalize_class_runtime, finalize_policy
from builder.model.pipeline import optimize_model
from builder.spec.loader import load_class
from builder.spec.schema import Architecture, HardwareClass
from tests.conftest import ROOT, require_tool
from tests.images import ARM64_CLASS

pytestmark = pytest.mark.container
ARM = Architecture.aarch64


@pytest.fixture(scope="module")
def arm64_class() -> HardwareClass:
    for tool in ("mmdebstrap", "podman"):
        require_tool(tool)
    why = why_not_emulated(ARM)
    if why is not None:
        require_tool(f"qemu-user for arm64 ({why})")
    return load_class(ARM64_CLASS, ROOT / "images")


@pytest.fixture(scope="module")
def arm64_base(arm64_class: HardwareClass, test_state: StateDir) -> BaseImage:
    return make_base_for_class(make_context(PodmanEngine(test_state), state=test_state), arm64_class)


def test_arm64_base_is_reproducible_and_keeps_an_efi_kernel(arm64_class: HardwareClass, arm64_base: BaseImage,
                                                           test_state: StateDir, scratch_state: StateDir) -> None:
    """Two cold bootstraps through qemu-user (the second into another store) give the same bytes and
    image id; the arm64 kernel, gzip in Debian's package, is in the base uncompressed: an arm64 PE image."""
    first = arm64_base if arm64_base.built else make_base_for_class(
        make_context(PodmanEngine(test_state), state=test_state), arm64_class, force=True)
    second = make_base_for_class(make_context(PodmanEngine(scratch_state), state=scratch_state), arm64_class)
    assert second.built is True
    assert (second.tarball_sha256, second.image_id) == (first.tarball_sha256, first.image_id)
    assert first.kernel.endswith("-arm64")
    with tarfile.open(first.tarball) as tar:
        member = tar.getmember(f"./usr/lib/modules/{first.kernel}/vmlinuz")
        head = tar.extractfile(member).read(4096)  # type: ignore[union-attr]
        names = tar.getnames()
    assert head[:2] == b"MZ"
    pe = struct.unpack_from("<I", head, 0x3C)[0]
    assert struct.unpack_from("<H", head, pe + 4)[0] == 0xAA64  # IMAGE_FILE_MACHINE_ARM64
    assert "./usr/lib/systemd/boot/efi/systemd-bootaa64.efi" in names
    assert not [n for n in names if n.startswith("./boot/vmlinuz")]


def test_the_gate_measures_on_arm64_and_what_fails_there_is_refused(arm64_class: HardwareClass,
                                                                    arm64_base: BaseImage, test_state: StateDir,
                                                                    tmp_path: Path) -> None:
    (model,) = arm64_class.spec.models
    policy, gates = finalize_policy(arm64_class, model)
    runtime = finalize_class_runtime(arm64_class, test_state, f"images/{ARM64_CLASS}.yaml")
    assert runtime is not None and runtime.container is not None
    assert runtime.container.cpu == EMULATED_CPU[ARM]

    def gate(cpu: str, out: Path) -> dict[str, dict[str, object]]:
        rt = dataclasses.replace(runtime, container=dataclasses.replace(runtime.container, cpu=cpu))
        report = optimize_model(ROOT / model.source, ROOT / str(model.optimization.calibration),
                                ROOT / model.validation.dataset, policy, gates, out, runtime=rt, name="digits")
        assert report.runtime["isa"] == "aarch64" and report.runtime["emulated"] is True
        rows = {c.name: {"accuracy": c.accuracy, "passed": c.passed, "diff": c.max_abs_diff}
                for c in report.candidates}
        hosts = {c.name: c.accuracy for c in report.reference}
        assert hosts == {"fp32": pytest.approx(0.986, abs=1e-3), "int8-static": pytest.approx(0.986, abs=1e-3),
                         "int8-dynamic": pytest.approx(0.986, abs=1e-3)}, hosts
        return rows

    device = gate(EMULATED_CPU[ARM], tmp_path / "device-cpu")
    assert all(r["passed"] for r in device.values()), device
    assert device["int8-static"]["diff"] == 0.0  # the same outputs as on x86_64, bit for bit
    assert float(device["int8-dynamic"]["diff"]) < policy.golden_tolerance, device  # within the device's check
    golden = tmp_path / "device-cpu" / "golden.npz"
    assert golden.is_file()  # the outputs the device replays: from this arm64 run

    sme = gate("max", tmp_path / "sme")
    assert sme["int8-dynamic"]["passed"] is False and float(sme["int8-dynamic"]["accuracy"]) < 0.2, sme
    assert sme["int8-static"]["passed"] is True, sme
