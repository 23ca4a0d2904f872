"""arm64 from an x86_64 host: the binfmt check before any work, the one kernel finder and its EFI
check, QEMU's virt machine with AAVMF, and a disk's architecture read back from its GPT."""

from __future__ import annotations

import gzip
import json
import platform
from pathlib import Path

import pytest

from builder.base import capability, emulation
from builder.core.errors import BuildError
from builder.disk import assemble, vm
from builder.spec.loader import load_class
from builder.spec.schema import Architecture
from kiln_device import kernel, lint
from tests.conftest import IN_CI, ROOT, require_tool

pytestmark = pytest.mark.unit
ARM = Architecture.aarch64
REGISTERED = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\nmagic 7f45\n"


def binfmt(tmp_path: Path, entry: str | None, *, mounted: bool = True) -> Path:
    d = tmp_path / "binfmt_misc"
    d.mkdir()
    if mounted:
        (d / "status").write_text("enabled\n")
    if entry is not None:
        (d / "qemu-aarch64").write_text(entry)
    return d


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the emulation cases are an x86_64 host's")
@pytest.mark.parametrize(("entry", "mounted", "expected"), [
    (None, False, "binfmt_misc is not mounted"),
    (None, True, "no qemu-aarch64 binfmt_misc registration"),
    (REGISTERED.replace("enabled", "disabled", 1), True, "registered but disabled"),
    (REGISTERED.replace("flags: PF", "flags: P"), True, "without the F flag"),
    (REGISTERED.replace("/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "/nonexistent/qemu-aarch64")
     .replace("flags: PF", "flags: P"), True, "/nonexistent/qemu-aarch64, which is not on this host"),
], ids=["unmounted", "unregistered", "disabled", "no-F-flag", "no-interpreter"])
def test_a_host_that_cannot_run_arm64_says_why(tmp_path: Path, entry: str | None, mounted: bool,
                                               expected: str) -> None:
    why = emulation.why_not_emulated(ARM, binfmt(tmp_path, entry, mounted=mounted))
    assert why is not None and expected in why, why


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the emulation cases are an x86_64 host's")
def test_with_the_f_flag_the_interpreter_need_not_be_on_this_host(tmp_path: Path) -> None:
    """The kernel opened it at registration: a builder container of a host that registered it works."""
    entry = REGISTERED.replace("/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "/nonexistent/qemu-aarch64")
    assert emulation.why_not_emulated(ARM, binfmt(tmp_path, entry)) is None


def test_the_host_architecture_never_needs_emulation() -> None:
    host = emulation.host_architecture()
    assert host is not None
    assert emulation.why_not_emulated(host, Path("/nonexistent")) is None


def test_the_arm64_class_is_buildable_here_once_setup_registered_qemu() -> None:
    """scripts/setup.sh mounts binfmt_misc and registers qemu-aarch64; CI runs it, so there it must hold."""
    why = emulation.why_not_emulated(ARM)
    if why is not None:
        if IN_CI:
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    hc = load_class("arm64-vision", ROOT / "images")
    assert capability.why_not_buildable(hc, probe_network=False) == []


def test_a_build_that_cannot_emulate_stops_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """No binfmt_misc (a container without it): `kiln build arm64-vision` refuses in its first step, before
    the base, the wheels or the gate; nothing is made and no build record is left."""
    require_tool("podman")
    from builder.core.context import make_context
    from builder.core.engine import PodmanEngine
    from builder.core.state import make_state_dir
    from builder.image.build import build_class

    monkeypatch.setattr(emulation, "BINFMT_DIR", tmp_path / "no-binfmt_misc")
    monkeypatch.setattr(emulation, "host_architecture", lambda: Architecture.x86_64)
    with pytest.raises(BuildError) as err:
        emulation.check_emulation(ARM)
    assert "cannot build for aarch64 here: aarch64 binaries cannot run" in err.value.message
    assert "scripts/setup.sh" in (err.value.hint or "")
    state = make_state_dir(root=tmp_path / "state")
    hc = load_class("arm64-vision", ROOT / "images")
    with pytest.raises(BuildError) as built:
        build_class(make_context(PodmanEngine(state), state=state), hc, source="images/arm64-vision.yaml",
                    version="0.0.1-refused")
    assert "arm64-vision cannot be built on this machine" in built.value.message
    assert "binfmt_misc is not mounted" in built.value.message
    assert not any((tmp_path / "state").rglob("rootfs.tar")) and not any((tmp_path / "state").rglob("*.whl"))
    from builder.core import paths
    assert not paths.record_path("arm64-vision", "0.0.1-refused").parent.exists()


# --- one kernel finder ---------------------------------------------------------------------

EFI_KERNEL = b"MZ" + bytes(62) + b"ARMd"  # an arm64 Image with its EFI stub starts MZ (like x86's bzImage)


def image_tree(root: Path, kernels: dict[str, bytes]) -> Path:
    for kver, data in kernels.items():
        d = root / "usr/lib/modules" / kver
        d.mkdir(parents=True)
        (d / "vmlinuz").write_bytes(data)
        (d / "initramfs.img").write_bytes(b"070701")
    return root


def test_kernels_are_found_in_version_order_not_string_order(tmp_path: Path) -> None:
    tree = image_tree(tmp_path, {"6.1.0-9-arm64": EFI_KERNEL, "6.1.0-10-arm64": EFI_KERNEL})
    (tree / "usr/lib/modules/6.1.0-2-arm64").mkdir()  # modules only, no kernel
    assert [k.version for k in kernel.find_kernels(tree)] == ["6.1.0-9-arm64", "6.1.0-10-arm64"]
    assert [d.name for d in kernel.kernel_dirs(tree)] == ["6.1.0-2-arm64", "6.1.0-9-arm64", "6.1.0-10-arm64"]


def test_a_gzip_kernel_is_refused_by_the_disk_the_lint_and_the_agent_alike(tmp_path: Path) -> None:
    """Debian's arm64 vmlinuz is gzip: systemd-boot cannot start it. One check, three callers."""
    from builder.core.errors import DiskError
    from builder.disk.unpacked import find_kernel
    from kiln_device.agent.slot import check_tree
    from kiln_device.agent.versions import Candidate
    from kiln_device.errors import AgentError
    from tests.ota import release_files

    tree = tmp_path / "root"
    for rel, data in release_files(version="2.0.0").items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    cand = Candidate(version="2.0.0", compatible="kiln,tiny", digest="sha256:" + "a" * 64)
    check_tree(tree, cand)  # the tiny image's kernel (not compressed) is taken
    [boot] = kernel.find_kernels(tree)
    boot.vmlinuz.write_bytes(gzip.compress(boot.vmlinuz.read_bytes(), mtime=0))
    assert kernel.kernel_format(boot.vmlinuz) == "gzip"
    with pytest.raises(DiskError, match="gzip-compressed: systemd-boot cannot start it"):
        find_kernel(tree, "test")
    assert any("gzip-compressed" in p for p in lint.check_kernel(tree, {}))
    with pytest.raises(AgentError, match="gzip-compressed: systemd-boot cannot start it"):
        check_tree(tree, cand)


def test_an_efi_kernel_passes_and_is_the_newest(tmp_path: Path) -> None:
    from builder.disk.unpacked import find_kernel

    tree = image_tree(tmp_path, {"6.1.0-9-arm64": EFI_KERNEL, "6.1.0-10-arm64": EFI_KERNEL})
    kver, vmlinuz, _ = find_kernel(tree, "test")
    assert kver == "6.1.0-10-arm64" and vmlinuz.read_bytes()[:2] == b"MZ"
    assert kernel.why_not_bootable(vmlinuz) is None


# --- QEMU and the disk ------------------------------------------------------------------------

def test_arm64_qemu_argv_is_the_virt_machine_with_fast_pointer_auth_and_mttcg(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(512))
    fw = vm.Firmware(Path("/fw/AAVMF_CODE.fd"), Path("/fw/AAVMF_VARS.fd"))
    vp = vm.finalize_vm_paths(tmp_path / "vm")
    cfg = vm.VMConfig(disk=image, architecture=ARM, tpm=True)
    argv = vm.finalize_qemu_argv(cfg, fw, vp, vm.Accel.tcg, 2222)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-aarch64"
    assert "-machine virt -accel tcg,thread=multi -cpu max,pauth-impdef=on" in joined
    assert "-cpu max,pauth-impdef=on,sme=off " in joined  # the gate's qemu-user CPU too (builder.base.emulation)
    assert "ICH9" not in joined and "q35" not in joined
    assert "-device i6300esb" in joined  # a watchdog the virt board lacks
    assert "tpm-tis-device,tpmdev=tpm0" in joined
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/AAVMF_CODE.fd" in argv


def test_an_arm64_guest_on_an_x86_64_host_runs_under_tcg_and_kvm_is_refused() -> None:
    if platform.machine() != "x86_64":
        pytest.skip("an x86_64 host's case")
    fw = vm.Firmware(Path("/fw/C"), Path("/fw/V"))
    accel, note = vm.finalize_accel(vm.Accel.auto, "qemu-system-aarch64", fw, ARM)
    assert accel is vm.Accel.tcg and note is not None and "aarch64 guest" in note
    from builder.core.errors import VMError
    with pytest.raises(VMError, match="KVM cannot run an aarch64 guest"):
        vm.finalize_accel(vm.Accel.kvm, "qemu-system-aarch64", fw, ARM)


def test_missing_aavmf_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.core.errors import ToolMissing
    from builder.disk import machine

    monkeypatch.setattr(machine, "FIRMWARE", {**machine.FIRMWARE, ARM: ((("/nonexistent/C.fd", "/nonexistent/V.fd"),),
                                                              "AAVMF", "apt-get install qemu-efi-aarch64")})
    with pytest.raises(ToolMissing) as err:
        vm.find_firmware(arch=ARM)
    assert "AAVMF" in err.value.message and "qemu-efi-aarch64" in (err.value.hint or "")


def test_a_raw_disk_says_its_architecture_by_its_root_partition_type(tmp_path: Path) -> None:
    """`kiln vm run DISK` boots an arm64 disk as arm64 even without its record: the GPT root type says it
    (a disk with no partition table, or none Kiln knows, is x86_64)."""
    arch = ARM
    require_tool("sfdisk")
    from builder.core.run import run

    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(64 * 2**20)
    script = f"label: gpt\nstart=2048, size=8192, type={assemble.ESP_TYPE}, name=esp\n" \
             f"start=10240, size=8192, type={assemble.ROOT_TYPES[arch]}, name=root-a\n"
    assert vm.finalize_disk_architecture(image) is Architecture.x86_64  # no table yet
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image], input=script.encode(), capture=True)
    assert vm.finalize_disk_architecture(image) is arch
    (tmp_path / "disk.raw.json").write_text('{"architecture": "x86_64"}')
    assert vm.finalize_disk_architecture(image) is Architecture.x86_64  # the record, when there is one


# --- the release report says where the gate measured --------------------------------------------

def test_the_release_report_names_the_isa_the_gate_measured_on(tmp_path: Path) -> None:
    """An arm64 class's gate table says it was measured on aarch64 under qemu-user, and that the host's
    rows are a reference; an x86_64 class's says the build host's ISA."""
    from builder.model.report import Report, runtime_lines
    from builder.release.report import class_section

    def section(runtime: dict[str, object], reference: list[dict[str, object]]) -> str:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        (d / "models/digits/1.0.0").mkdir(parents=True)
        report = {"model": "digits", "source": "m", "source_sha256": "0", "candidates": [], "chosen": "fp32",
                  "reasons": [], "onnxruntime_version": "1.32.0", "policy": {}, "gates": {}, "runtime": runtime,
                  "reference": reference, "host_isa": "x86_64"}
        (d / "models/digits/1.0.0/report.json").write_text(json.dumps(report))
        record = {"class": "arm64-vision", "version": "1.0.0", "context": str(d), "layers": [],
                  "models": [{"name": "digits", "version": "1.0.0", "precision": "int8",
                              "sha256": "sha256:" + "0" * 64}]}
        return class_section(record, None)

    arm = section({"name": "onnxruntime", "version": "1.32.0", "measured_with": "CPUExecutionProvider",
                   "isa": "aarch64", "emulated": True}, [{"name": "fp32", "precision": "fp32"}])
    assert 'CPUExecutionProvider on <span data-k="arm64-vision.model.digits.isa">aarch64</span> (emulated: qemu-user)' \
        in arm
    assert "the build host's (x86_64) figures kept as reference" in arm
    host = section({}, [])
    assert '<span data-k="arm64-vision.model.digits.isa">x86_64</span>' in host and "emulated" not in host
    lines = runtime_lines(Report.from_dict({"model": "d", "source": "m", "source_sha256": "0", "candidates": [],
                                            "chosen": None, "reasons": [], "onnxruntime_version": "1.32.0",
                                            "policy": {}, "gates": {}, "host_isa": "x86_64",
                                            "runtime": {"measured_with": "CPUExecutionProvider", "isa": "aarch64",
                                                        "emulated": True, "name": "onnxruntime",
                                                        "version": "1.32.0"}}))
    assert lines[0].startswith("gated on CPUExecutionProvider on aarch64 (emulated: qemu-user)")
