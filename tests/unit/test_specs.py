"""Loading the shipped classes, and a table of bad specs with the exact error expected."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.core.errors import SpecError
from builder.spec.loader import known_classes, load_class
from builder.spec.schema import AcceleratorKind, Family, HardwareClass

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["arm64-vision", "factory-gateway-gpu", "intel-lowpower-detector", "jetson-vision-standard",
           "medical-cart-cpu", "qemu-x86_64"]


def test_the_six_classes_are_shipped() -> None:
    # and jetson-vision-standard's stand-in, from its spec.standIn (builder.spec.stand_in, tests/unit/test_stand_in.py)
    assert known_classes(ROOT / "images") == [*CLASSES[:4], "jetson-vision-standard-stand-in", *CLASSES[4:]]


@pytest.mark.parametrize("name", CLASSES)
def test_class_loads_and_is_frozen(name: str) -> None:
    hc = load_class(name, ROOT / "images")
    assert isinstance(hc, HardwareClass)
    assert hc.spec.compatible.startswith(f"{hc.metadata.vendor},{name}")
    with pytest.raises(Exception, match="frozen"):
        hc.spec.development = True  # type: ignore[misc]


def test_classes_are_distinct_targets() -> None:
    loaded = {n: load_class(n, ROOT / "images").spec for n in CLASSES}
    # fedora-bootc is the documented alternative base of intel-lowpower-detector (commented in its YAML)
    assert {s.base.family for s in loaded.values()} == set(Family) - {Family.fedora_bootc}
    assert {s.base.family.package_manager for s in loaded.values()} == {"apt", "dnf"}
    assert {s.accelerator.kind for s in loaded.values()} >= {
        AcceleratorKind.none, AcceleratorKind.nvidia_dgpu, AcceleratorKind.nvidia_jetson,
        AcceleratorKind.intel_igpu}
    assert loaded["jetson-vision-standard"].architecture.value == "aarch64"
    assert loaded["qemu-x86_64"].development and not loaded["medical-cart-cpu"].development
    # defaults merged under the class
    assert loaded["medical-cart-cpu"].disk.esp == 256 * 1024**2
    assert loaded["medical-cart-cpu"].rollout.boot_tries == 2


# --- bad specs ---------------------------------------------------------------


def base_doc() -> dict[str, Any]:
    """A valid, self-contained class (no extends) to mutate."""
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "HardwareClass",
        "metadata": {"name": "bad", "vendor": "acme"},
        "spec": {
            "architecture": "x86_64",
            "compatible": "acme,bad",
            "base": {"family": "debian", "source": "bootstrap", "release": "bookworm",
                     "snapshot": "20261101T000000Z"},
            "kernel": {"package": "linux-image-amd64", "args": ["quiet"]},
            "runtime": {"name": "onnxruntime", "version": "1.32.0",
                        "executionProviders": ["CPUExecutionProvider"]},
            "models": [{
                "name": "digits", "version": "1.0.0", "source": "models/digits/digits.onnx",
                "optimization": {"calibration": "models/digits/data/calibration.npz"},
                "validation": {"dataset": "models/digits/data/validation.npz"},
            }],
            "envelope": {"ram": "1GiB", "storage": "8GiB", "p95LatencyMs": 50},
            "disk": {"root": "2GiB", "data": "1GiB"},
            "rollout": {"healthChecks": ["inference-golden", "inference-service", "agent"]},
        },
    }


def set_in(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


DELETE = object()


@dataclass(frozen=True)
class Bad:
    id: str
    path: str
    value: Any
    errors: tuple[str, ...]  # each a substring of one reported problem, in order


BAD = [
    Bad("misspelled-key", "spec.kernal", {"args": []},
        ("bad.yaml:44: spec.kernal: unknown key (did you mean 'kernel'?)",)),
    Bad("snake-case-key", "spec.envelope.p95_latency_ms", 5,
        ("spec.envelope.p95_latency_ms: unknown key (did you mean 'p95LatencyMs'?)",)),
    Bad("bad-enum", "spec.models.0.precision", "int4",
        ("spec.models[0].precision: expected one of auto, fp32, fp16, int8",)),
    Bad("wrong-type", "spec.rollout.bootTries", "three",
        ("spec.rollout.bootTries: expected a valid integer", "got 'three'")),
    Bad("missing-required", "spec.runtime", DELETE, ("spec.runtime: required key is missing",)),
    Bad("bad-api-version", "apiVersion", "kiln.dev/v2", ("apiVersion: expected one of kiln.dev/v1alpha1",)),
    Bad("injection-newline-package", "spec.packages", ["curl\nRUN rm -rf /"],
        ("spec.packages[0]: 'curl\\nRUN rm -rf /' is not a valid package name",)),
    Bad("injection-and-package", "spec.packages", ["curl && rm -rf /"],
        ("spec.packages[0]: 'curl && rm -rf /' is not a valid package name",)),
    Bad("injection-karg", "spec.kernel.args", ["quiet; reboot"],
        ("spec.kernel.args[0]: 'quiet; reboot' is not a valid kernel argument",)),
    Bad("injection-karg-space", "spec.kernel.args", ["a b"],
        ("spec.kernel.args[0]: 'a b' is not a valid kernel argument",)),
    Bad("injection-label", "metadata.labels", {"x": "a\"\nLABEL evil=1"},
        ("metadata.labels.x: ", "is not a valid label value")),
    Bad("injection-path", "spec.models.0.source", "../../etc/passwd",
        ("spec.models[0].source: '../../etc/passwd' must not contain '..'",)),
    Bad("injection-url", "spec.runtime.index", "https://x.org/simple --trusted-host evil",
        ("spec.runtime.index: ", "is not a valid URL")),
    Bad("compatible-prefix", "spec.compatible", "other,bad",
        ("spec.compatible: 'other,bad' must start with 'acme,bad'",)),
    Bad("unpinned-production-base", "spec.base.snapshot", DELETE,
        ("spec.base.snapshot: production classes (development: false) pin their base",)),
    Bad("registry-base-without-digest", "spec.base",
        {"family": "fedora-bootc", "source": "registry", "image": "quay.io/fedora/fedora-bootc:41"},
        ("spec.base.digest: production classes (development: false) pin their base",)),
    Bad("model-larger-than-storage", "spec.envelope.storage", 1000,
        ("spec.disk: esp + 2 x root + data", "spec.models[0].source: model is")),
    Bad("disk-does-not-fit", "spec.disk.root", "4GiB",
        ("spec.disk: esp + 2 x root + data = 9.25 GiB does not fit the storage envelope (8 GiB)",)),
    Bad("bad-size", "spec.envelope.ram", "lots",
        ("spec.envelope.ram: 'lots' is not a size",)),
    Bad("missing-model-file", "spec.models.0.source", "models/nope.onnx",
        ("spec.models[0].source: file not found: models/nope.onnx",)),
    Bad("cuda-on-cpu-runtime", "spec.runtime.executionProviders", ["CUDAExecutionProvider"],
        ("spec.runtime.executionProviders[0]: CUDAExecutionProvider is not provided by onnxruntime",)),
    Bad("gpu-without-driver", "spec.accelerator", {"kind": "nvidia-dgpu"},
        ("spec.accelerator.driver: NVIDIA classes name their driver",
         "spec.accelerator.toolkit: NVIDIA classes name their container toolkit",
         "spec.runtime.name: NVIDIA classes use onnxruntime-gpu",
         "spec.rollout.healthChecks: GPU classes must check gpu-visible")),
    Bad("gate-looser-than-envelope", "spec.models.0.gates", {"maxP95LatencyMs": 80},
        ("spec.models[0].gates.maxP95LatencyMs: 80.0 ms is looser than the class envelope (50.0 ms)",)),
    Bad("no-golden-check", "spec.rollout.healthChecks", ["agent"],
        ("spec.rollout.healthChecks: every class checks 'inference-golden'",)),
    Bad("jetson-on-x86", "spec.accelerator",
        {"kind": "nvidia-jetson", "driver": {"name": "l4t", "version": "36.4.3"},
         "toolkit": {"name": "nvidia-container-toolkit", "version": "1.16.2", "cdi": "csv"}},
        ("spec.runtime.name: NVIDIA classes use onnxruntime-gpu", "spec.rollout.healthChecks",
         "spec.architecture: Jetson classes are aarch64", "spec.base.family: Jetson classes use the l4t family",
         "spec.bootControl: Jetson classes use the nvbootctrl")),
    Bad("reserved-label", "metadata.labels", {"dev.kiln.compatible": "evil,other"},
        ("metadata.labels.dev.kiln.compatible.[key]: ", "is reserved: Kiln sets the dev.kiln.* labels itself")),
    Bad("reserved-oci-label", "metadata.labels", {"org.opencontainers.image.version": "9.9.9"},
        ("is reserved: Kiln sets the org.opencontainers.image.* labels itself",)),
    Bad("production-ssh", "spec.access", {"ssh": True},
        ("spec.access.ssh: production classes (development: false) ship without an SSH server",)),
    Bad("fallback-mirror-without-snapshot", "spec.base",
        {"family": "debian", "source": "bootstrap", "release": "bookworm",
         "fallbackMirror": "http://deb.debian.org/debian"},
        ("spec.base.fallbackMirror: a fallback mirror stands in for an unreachable snapshot",)),
    Bad("pinned-precision-without-candidate", "spec.models.0.precision", "fp16",
        ("spec.models[0].precision: pinned to fp16 but no fp16 candidate",)),
    Bad("accelerator-without-fallback", "spec.accelerator", {"kind": "intel-igpu"},
        ("spec.accelerator.fallback: a class with an accelerator declares what a device does without it",)),
    Bad("degrade-without-envelope", "spec.accelerator", {"kind": "intel-igpu", "fallback": {"policy": "degrade"}},
        ("spec.accelerator.fallback.p95LatencyMs: policy degrade needs the degraded latency envelope",)),
    Bad("degraded-envelope-tighter-than-the-class", "spec.accelerator",
        {"kind": "intel-igpu", "fallback": {"policy": "degrade", "p95LatencyMs": 10}},
        ("spec.accelerator.fallback.p95LatencyMs: 10.0 ms is tighter than the class envelope (50.0 ms)",)),
    Bad("fail-with-degraded-envelope", "spec.accelerator",
        {"kind": "intel-igpu", "fallback": {"policy": "fail", "p95LatencyMs": 80}},
        ("spec.accelerator.fallback.p95LatencyMs: a degraded envelope applies to policy degrade only",)),
    Bad("bad-fallback-policy", "spec.accelerator", {"kind": "intel-igpu", "fallback": {"policy": "ignore"}},
        ("spec.accelerator.fallback.policy: expected one of degrade, fail",)),
    Bad("fallback-on-a-cpu-class", "spec.accelerator", {"fallback": {"policy": "fail"}},
        ("spec.accelerator.fallback: a class without an accelerator has no fallback",)),
]


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_base_doc_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    load_class(write(tmp_path, base_doc()))


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_spec_reports_located_error(bad: Bad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path = write(tmp_path, set_in(base_doc(), bad.path, bad.value))
    with pytest.raises(SpecError) as info:
        load_class(path)
    text = str(info.value)
    assert info.value.exit_code == 2
    assert text.startswith(f"{path} has {len(info.value.problems)} error")
    for expected in bad.errors:
        assert expected in text, f"expected {expected!r} in:\n{text}"
    for problem in info.value.problems:  # every problem is located: file:line: path: message
        assert problem.startswith(f"{path}:"), problem


def test_secure_boot_where_kiln_cannot_verify_the_boot_is_refused(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    load_class(write(tmp_path, set_in(base_doc(), "spec.secureBoot", True)))  # x86_64, lz4: fine
    doc = set_in(set_in(base_doc(), "spec.secureBoot", True), "spec.disk.compression", "zstd")
    doc = set_in(doc, "spec.architecture", "aarch64")
    with pytest.raises(SpecError) as info:
        load_class(write(tmp_path, doc))
    text = str(info.value)
    assert "spec.secureBoot: verified boot is x86_64 only so far" in text
    assert "spec.disk.compression: verified boot measures each layer's erofs as the device makes it" in text


def test_every_error_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    doc = set_in(base_doc(), "spec.kernal", {})
    doc = set_in(doc, "spec.models.0.precision", "int4")
    doc = set_in(doc, "spec.packages", ["a b"])
    with pytest.raises(SpecError) as info:
        load_class(write(tmp_path, doc))
    text = str(info.value)
    assert "spec.kernal: unknown key" in text
    assert "spec.models[0].precision: expected one of" in text
    assert "spec.packages[0]: 'a b' is not a valid package name" in text


@pytest.mark.parametrize("text, expected", [
    ("spec: [unclosed", "invalid YAML"),
    ("", "the file is empty"),
    ("- a list\n", "expected a mapping"),
    ("a: 1\na: 2\n", "a: duplicate key"),
    ("a: &x [*x]\n", "too deep or too large"),
    ("a: !!python/object:os.system echo\n", "could not determine a constructor"),
])
def test_malformed_yaml(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=expected):
        load_class(path)


def test_unknown_class_name_suggests() -> None:
    with pytest.raises(SpecError, match="did you mean 'qemu-x86_64'"):
        load_class("qemu-x86-64", ROOT / "images")


def test_extends_missing_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path = write(tmp_path, set_in(base_doc(), "metadata.extends", "_nothere"))
    with pytest.raises(SpecError, match="no defaults file"):
        load_class(path)


def test_error_line_points_into_defaults_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    (tmp_path / "_d.yaml").write_text(
        "apiVersion: kiln.dev/v1alpha1\nkind: HardwareClassDefaults\nspec:\n  disk:\n    esp: huge\n")
    doc = set_in(base_doc(), "metadata.extends", "_d")
    doc["spec"]["disk"].pop("esp", None)
    with pytest.raises(SpecError) as info:
        load_class(write(tmp_path, doc))
    assert f"{tmp_path / '_d.yaml'}:5: spec.disk.esp: 'huge' is not a size" in str(info.value)


def gpu_doc() -> dict[str, Any]:
    """images/factory-gateway-gpu.yaml as a document (extends _defaults, copied next to it)."""
    return yaml.safe_load((ROOT / "images/factory-gateway-gpu.yaml").read_text())


GPU_BAD = [
    Bad("toolkit-none-names-a-package", "spec.accelerator.toolkit",
        {"source": "none", "name": "nvidia-container-toolkit", "version": "1.17.8", "cdi": "boot"},
        ("spec.accelerator.toolkit.name: source: none installs no toolkit",
         "spec.accelerator.toolkit.version: source: none installs no toolkit")),
    Bad("toolkit-none-csv", "spec.accelerator.toolkit", {"source": "none", "cdi": "csv"},
        ("spec.accelerator.toolkit.cdi: CSV-mode CDI is nvidia-ctk's: it needs the toolkit",)),
    Bad("toolkit-repository-unnamed", "spec.accelerator.toolkit",
        {"source": "repository", "name": "nvidia-container-toolkit", "version": "1.17.8"},
        ("spec.accelerator.toolkit.repository: source: repository needs the toolkit's repository",)),
    Bad("toolkit-repository-unknown", "spec.accelerator.toolkit",
        {"source": "repository", "repository": "nvidia", "name": "nvidia-container-toolkit", "version": "1.17.8"},
        ("spec.accelerator.toolkit.repository: 'nvidia' is not in spec.repositories (it has: none)",)),
    Bad("toolkit-bad-source", "spec.accelerator.toolkit.source", "vendor",
        ("spec.accelerator.toolkit.source: expected one of repository, none",)),
    Bad("modules-without-build-packages", "spec.accelerator.driver.buildPackages", DELETE,
        ("spec.accelerator.driver.buildPackages: kernelModules: image needs the packages that build the modules",)),
    Bad("cuda13-runtime-on-535", "spec.runtime.version", "1.31.1",
        ("factory-gateway-gpu.yaml:", "spec.runtime.version: onnxruntime-gpu 1.31.1 is built for CUDA 13, which needs "
         "an NVIDIA driver >= 580; the class pins driver 535.309.01")),
    Bad("cuda12-runtime-on-470", "spec.accelerator.driver.version", "470.256.02-1",
        ("spec.runtime.version: onnxruntime-gpu 1.26.0 is built for CUDA 12, which needs an NVIDIA driver >= 525",)),
]


@pytest.mark.parametrize("bad", GPU_BAD, ids=[b.id for b in GPU_BAD])
def test_bad_gpu_spec_reports_located_error(bad: Bad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    (tmp_path / "_defaults.yaml").write_text((ROOT / "images/_defaults.yaml").read_text())
    path = tmp_path / "factory-gateway-gpu.yaml"
    path.write_text(yaml.safe_dump(set_in(gpu_doc(), bad.path, bad.value), sort_keys=False))
    with pytest.raises(SpecError) as info:
        load_class(path)
    text = str(info.value)
    for expected in bad.errors:
        assert expected in text, f"expected {expected!r} in:\n{text}"
    for problem in info.value.problems:
        assert problem.startswith(f"{path}:"), problem


def test_gpu_class_says_where_everything_comes_from() -> None:
    spec = load_class("factory-gateway-gpu", ROOT / "images").spec
    driver, toolkit = spec.accelerator.driver, spec.accelerator.toolkit
    assert driver is not None and toolkit is not None
    assert (driver.upstream_version, driver.major) == ("535.309.01", 535)
    assert driver.build_packages == ("nvidia-kernel-dkms",) and "nvidia-driver" not in driver.packages
    assert not toolkit.installed and toolkit.cdi.value == "boot"
    assert spec.runtime.extras == ("cuda", "cudnn")



def test_dropped_kernel_modules_must_leave_what_the_boot_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """spec.kernel.dropModules: every boot needs erofs, overlay, ext4, vfat and virtio; the problems are
    reported at once, each located."""
    monkeypatch.chdir(ROOT)
    doc = set_in(base_doc(), "spec.kernel.dropModules",
                 ["drivers/gpu", "fs", "drivers/virtio/x", "drivers/gpu", ".", "drivers/gpu/drm"])
    with pytest.raises(SpecError) as info:
        load_class(write(tmp_path, doc))
    text = str(info.value)
    assert info.value.exit_code == 2 and len(info.value.problems) == 5, text
    assert "spec.kernel.dropModules[1]: 'fs' drops fs/erofs, which every Kiln boot needs" in text
    assert "spec.kernel.dropModules[2]: 'drivers/virtio/x' drops drivers/virtio, which every Kiln boot needs" in text
    assert "spec.kernel.dropModules[3]: 'drivers/gpu' is listed twice" in text
    assert "spec.kernel.dropModules[4]: '.' is not a directory of the module tree" in text
    assert "spec.kernel.dropModules[5]: 'drivers/gpu/drm' is already dropped with 'drivers/gpu'" in text
    with pytest.raises(SpecError, match=r"spec.kernel.dropModules\[0\]: .*must not contain '\.\.'"):
        load_class(write(tmp_path, set_in(base_doc(), "spec.kernel.dropModules", ["../../etc"])))


def test_only_a_bootstrapped_debian_base_drops_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    doc = yaml.safe_load((ROOT / "images/medical-cart-cpu.yaml").read_text())
    doc = set_in(doc, "spec.kernel.dropModules", ["sound"])
    path = tmp_path / "medical-cart-cpu.yaml"
    path.write_text(yaml.safe_dump(doc))
    (tmp_path / "_defaults.yaml").write_text((ROOT / "images/_defaults.yaml").read_text())
    with pytest.raises(SpecError, match=r"spec.kernel.dropModules: only a Debian bootstrap base can leave modules out"):
        load_class(path)
