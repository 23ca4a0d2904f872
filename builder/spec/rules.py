"""Contract checks: rules across fields that a schema cannot express.

Each check takes the loaded class and yields (loc, message); `check` runs
them all and formats every problem with its file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from builder.core.locations import Loc, format_loc, where
from builder.core.paths import project_root
from builder.core.safe import format_size
from builder.spec.schema import (
    AcceleratorKind,
    Architecture,
    BaseSource,
    BootControl,
    Candidate,
    CdiMode,
    FallbackPolicy,
    Family,
    HardwareClass,
    HealthCheck,
    ModuleBuild,
    Precision,
    Runtime,
    RuntimeName,
    SharingStrategy,
    ToolkitSource,
)
from kiln_device.lint import CUDA_MIN_DRIVER

Problem = tuple[Loc, str]
Check = Callable[[HardwareClass], Iterator[Problem]]
CHECKS: list[Check] = []


def contract(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


def check(hc: HardwareClass, lines: dict[Loc, str], source: str, path: Path | None) -> list[str]:
    found: list[Problem] = []
    if path is not None and path.stem != hc.metadata.name:
        found.append((("metadata", "name"),
                      f"'{hc.metadata.name}' must match the file name ({path.name})"))
    for fn in CHECKS:
        found.extend(fn(hc))
    if hc.stand_in_for is not None:  # what the stand-in took from spec.standIn is found there
        found = [(_stand_in_loc(loc), f"{hc.name}: {msg}") for loc, msg in found]
    return [f"{where(lines, loc, source)}: {format_loc(loc)}: {msg}" for loc, msg in found]


def _stand_in_loc(loc: Loc) -> Loc:
    from builder.spec.stand_in import REPLACED

    return ("spec", "standIn", *loc[1:]) if loc[:1] == ("spec",) and len(loc) > 1 and loc[1] in REPLACED else loc


@contract
def compatible_prefix(hc: HardwareClass) -> Iterator[Problem]:
    prefix = f"{hc.metadata.vendor},{hc.metadata.name}"
    c = hc.spec.compatible
    if not (c == prefix or c.startswith(prefix + "/") or c.startswith(prefix + ",")):
        yield (("spec", "compatible"),
               f"'{c}' must start with '{prefix}' (vendor, then the class name)")


@contract
def base_source(hc: HardwareClass) -> Iterator[Problem]:
    base = hc.spec.base
    if base.source is BaseSource.registry:
        if base.image is None:
            yield (("spec", "base", "image"), "a registry base needs an image reference")
        for key in ("release", "mirror", "snapshot"):
            if getattr(base, key) is not None:
                yield (("spec", "base", key), "only applies to a bootstrap base")
    else:
        if base.family.package_manager != "apt":
            yield (("spec", "base", "source"),
                   f"{base.family.value} bases come from a registry; bootstrap is for apt families")
        if base.release is None:
            yield (("spec", "base", "release"), "a bootstrap base needs a release (e.g. bookworm)")
        for key in ("image", "digest"):
            if getattr(base, key) is not None:
                yield (("spec", "base", key), "only applies to a registry base")
    if base.fallback_mirror is not None and (base.source is not BaseSource.bootstrap or base.snapshot is None):
        yield (("spec", "base", "fallbackMirror"),
               "a fallback mirror stands in for an unreachable snapshot: it needs a bootstrap base "
               "with spec.base.snapshot")


@contract
def base_pinned(hc: HardwareClass) -> Iterator[Problem]:
    if hc.spec.development or hc.spec.base.pinned:
        return
    key = "digest" if hc.spec.base.source is BaseSource.registry else "snapshot"
    yield (("spec", "base", key),
           f"production classes (development: false) pin their base: set spec.base.{key}")


# Module directories (relative to the module tree's kernel/) that every Kiln boot loads: the read-only
# erofs root, the /etc and /var overlays on the ext4 data partition, the ESP, virtio disks and consoles.
BOOT_MODULE_DIRS = ("fs/erofs", "fs/overlayfs", "fs/ext4", "fs/jbd2", "fs/fat", "fs/nls", "fs/efivarfs",
                    "drivers/block", "drivers/virtio", "drivers/char", "drivers/watchdog", "lib", "crypto")


@contract
def kernel_modules(hc: HardwareClass) -> Iterator[Problem]:
    drop = hc.spec.kernel.drop_modules
    if not drop:
        return
    base = hc.spec.base
    if base.source is not BaseSource.bootstrap or base.family is not Family.debian:
        yield (("spec", "kernel", "dropModules"),
               "only a Debian bootstrap base can leave modules out (the base is made by Kiln)")
    dirs = [path.strip("/") for path in drop]
    for i, (path, p) in enumerate(zip(drop, dirs, strict=True)):
        loc = ("spec", "kernel", "dropModules", i)
        if any(part in ("", ".") for part in p.split("/")):
            yield (loc, f"'{path}' is not a directory of the module tree (like sound or drivers/gpu)")
            continue
        if dirs.index(p) != i:
            yield (loc, f"'{path}' is listed twice")
            continue
        covering = [d for d in dirs if p.startswith(d + "/")]
        if covering:
            yield (loc, f"'{path}' is already dropped with '{covering[0]}'")
        for needed in BOOT_MODULE_DIRS:
            if p == needed or needed.startswith(p + "/") or p.startswith(needed + "/"):
                yield (("spec", "kernel", "dropModules", i),
                       f"'{path}' drops {needed}, which every Kiln boot needs")
                break


@contract
def accelerator_none(hc: HardwareClass) -> Iterator[Problem]:
    acc = hc.spec.accelerator
    if acc.kind is not AcceleratorKind.none:
        return
    for key in ("driver", "toolkit", "fallback"):
        if getattr(acc, key) is not None:
            yield (("spec", "accelerator", key), "a class without an accelerator has no " + key)
    if hc.spec.runtime.name is not RuntimeName.onnxruntime:
        yield (("spec", "runtime", "name"), "a CPU-only class uses the onnxruntime runtime")


@contract
def accelerator_nvidia(hc: HardwareClass) -> Iterator[Problem]:
    acc, spec = hc.spec.accelerator, hc.spec
    if not acc.kind.is_nvidia:
        return
    if hc.stand_in_for is not None:  # a stand-in (builder.spec.stand_in) still checks for it
        if HealthCheck.gpu_visible not in spec.rollout.health_checks:
            yield (("spec", "rollout", "healthChecks"), "GPU classes must check gpu-visible before blessing")
        return
    if acc.driver is None:
        yield (("spec", "accelerator", "driver"), "NVIDIA classes name their driver")
    if acc.toolkit is None:
        yield (("spec", "accelerator", "toolkit"), "NVIDIA classes name their container toolkit")
    if spec.runtime.name is not RuntimeName.onnxruntime_gpu:
        yield (("spec", "runtime", "name"), "NVIDIA classes use onnxruntime-gpu")
    if HealthCheck.gpu_visible not in spec.rollout.health_checks:
        yield (("spec", "rollout", "healthChecks"), "GPU classes must check gpu-visible before blessing")
    yield from _nvidia_kind(hc)


def _nvidia_kind(hc: HardwareClass) -> Iterator[Problem]:
    acc, spec = hc.spec.accelerator, hc.spec
    driver = acc.driver
    if acc.kind is AcceleratorKind.nvidia_dgpu:
        if driver is not None and driver.kernel_modules is not ModuleBuild.image:
            yield (("spec", "accelerator", "driver", "kernelModules"),
                   "dGPU kernel modules are built at image build time for the image's kernel: use 'image'")
        if acc.toolkit is not None and acc.toolkit.cdi is not CdiMode.boot:
            yield (("spec", "accelerator", "toolkit", "cdi"),
                   "dGPU CDI specs are generated at boot ('boot'), never baked")
        return
    if spec.architecture.value != "aarch64":
        yield (("spec", "architecture"), "Jetson classes are aarch64")
    if spec.base.family is not Family.l4t:
        yield (("spec", "base", "family"), "Jetson classes use the l4t family")
    if spec.boot_control is not BootControl.nvbootctrl:
        yield (("spec", "bootControl"), "Jetson classes use the nvbootctrl boot-control backend")
    if acc.toolkit is not None and acc.toolkit.cdi is not CdiMode.csv:
        yield (("spec", "accelerator", "toolkit", "cdi"), "Jetson uses CSV-mode CDI ('csv')")


@contract
def toolkit(hc: HardwareClass) -> Iterator[Problem]:
    """Where the container toolkit comes from is said, and says the same thing everywhere."""
    tk, loc = hc.spec.accelerator.toolkit, ("spec", "accelerator", "toolkit")
    if tk is None:
        return
    if tk.source is ToolkitSource.none:
        for key in ("repository", "name", "version"):
            if getattr(tk, key) is not None:
                yield ((*loc, key), "source: none installs no toolkit: drop it, or use source: repository")
        if tk.cdi is CdiMode.csv:
            yield ((*loc, "cdi"), "CSV-mode CDI is nvidia-ctk's: it needs the toolkit (source: repository)")
        return
    for key in ("name", "version", "repository"):
        if getattr(tk, key) is None:
            yield ((*loc, key), f"source: repository needs the toolkit's {key}")
    names = [r.name for r in hc.spec.repositories]
    if tk.repository is not None and tk.repository not in names:
        yield ((*loc, "repository"), f"'{tk.repository}' is not in spec.repositories "
                                     f"(it has: {', '.join(names) or 'none'})")


@contract
def driver_build(hc: HardwareClass) -> Iterator[Problem]:
    """kernelModules: image builds in a throwaway stage from buildPackages; nothing else has one."""
    driver, loc = hc.spec.accelerator.driver, ("spec", "accelerator", "driver")
    if driver is None:
        return
    builds = driver.kernel_modules is ModuleBuild.image
    if builds and hc.spec.base.family.package_manager == "apt" and not driver.build_packages:
        yield ((*loc, "buildPackages"), "kernelModules: image needs the packages that build the modules "
                                        "(e.g. nvidia-kernel-dkms)")
    if driver.build_packages and not builds:
        yield ((*loc, "buildPackages"), "only kernelModules: image builds modules")
    if builds and not driver.modules:
        yield ((*loc, "modules"), "name the modules the build must produce (checked with modinfo)")


def finalize_cuda_major(rt: Runtime) -> int | None:
    """The CUDA major the runtime's PyPI wheels are built for (None: not a CUDA runtime, or a custom index)."""
    if rt.name is not RuntimeName.onnxruntime_gpu or rt.index is not None:
        return None
    parts = [int(p) if p.isdigit() else 0 for p in rt.version.split(".")[:2]]
    minor = [*parts, 0][:2]
    if minor < [1, 19]:
        return 11
    return 12 if minor < [1, 27] else 13  # 1.19-1.26: CUDA 12.x; 1.27 on: CUDA 13


@contract
def cuda_driver_branch(hc: HardwareClass) -> Iterator[Problem]:
    """A dGPU driver branch runs the runtime's CUDA major (kiln_device.lint.CUDA_MIN_DRIVER)."""
    driver, cuda = hc.spec.accelerator.driver, finalize_cuda_major(hc.spec.runtime)
    if hc.spec.accelerator.kind is not AcceleratorKind.nvidia_dgpu or driver is None or cuda is None:
        return
    need = CUDA_MIN_DRIVER.get(cuda)
    if driver.major is not None and need is not None and driver.major < need:
        yield (("spec", "runtime", "version"),
               f"{hc.spec.runtime.name.value} {hc.spec.runtime.version} is built for CUDA {cuda}, which needs an "
               f"NVIDIA driver >= {need}; the class pins driver {driver.upstream_version} (onnxruntime-gpu "
               f"1.19-1.26 are CUDA 12 builds: driver >= {CUDA_MIN_DRIVER[12]}; 1.27 and later CUDA 13)")


@contract
def accelerator_intel(hc: HardwareClass) -> Iterator[Problem]:
    acc = hc.spec.accelerator
    if acc.kind not in (AcceleratorKind.intel_igpu, AcceleratorKind.intel_npu):
        return
    if hc.spec.runtime.name is not RuntimeName.onnxruntime_openvino:
        yield (("spec", "runtime", "name"), "Intel accelerators use onnxruntime-openvino")
    if acc.kind is AcceleratorKind.intel_npu and HealthCheck.npu_visible not in hc.spec.rollout.health_checks:
        yield (("spec", "rollout", "healthChecks"), "NPU classes must check npu-visible before blessing")


@contract
def sharing(hc: HardwareClass) -> Iterator[Problem]:
    s = hc.spec.accelerator.sharing
    if s.strategy is not SharingStrategy.none and hc.spec.accelerator.kind is not AcceleratorKind.nvidia_dgpu:
        yield (("spec", "accelerator", "sharing", "strategy"), "GPU sharing applies to NVIDIA dGPUs")
    if s.strategy is SharingStrategy.none and s.replicas != 1:
        yield (("spec", "accelerator", "sharing", "replicas"), "replicas need a sharing strategy")


@contract
def fallback(hc: HardwareClass) -> Iterator[Problem]:
    """What a device does without its accelerator is declared, never left to chance (kiln_device.degraded)."""
    acc, spec = hc.spec.accelerator, hc.spec
    loc: Loc = ("spec", "accelerator", "fallback")
    if acc.kind is AcceleratorKind.none:
        return
    if acc.fallback is None:
        yield (loc, "a class with an accelerator declares what a device does without it: "
                    "{policy: degrade, p95LatencyMs: N} (serve on the CPU) or {policy: fail} (roll back)")
        return
    envelope_p95 = spec.envelope.p95_latency_ms
    if acc.fallback.policy is FallbackPolicy.fail:
        if acc.fallback.p95_latency_ms is not None:
            yield ((*loc, "p95LatencyMs"), "a degraded envelope applies to policy degrade only")
        return
    if acc.fallback.p95_latency_ms is None:
        yield ((*loc, "p95LatencyMs"), "policy degrade needs the degraded latency envelope (p95 on the CPU)")
    elif acc.fallback.p95_latency_ms < envelope_p95:
        yield ((*loc, "p95LatencyMs"), f"{acc.fallback.p95_latency_ms} ms is tighter than the class envelope "
                                       f"({envelope_p95} ms): the CPU fallback cannot be held to more than the "
                                       "accelerator")
    if "CPUExecutionProvider" not in spec.runtime.execution_providers:
        yield (("spec", "runtime", "executionProviders"),
               "policy degrade serves on the CPU: list CPUExecutionProvider (last)")


@contract
def boot_control(hc: HardwareClass) -> Iterator[Problem]:
    if hc.spec.boot_control is BootControl.nvbootctrl and hc.spec.accelerator.kind is not AcceleratorKind.nvidia_jetson:
        yield (("spec", "bootControl"), "nvbootctrl is the Jetson backend; other classes use systemd-boot")


@contract
def secure_boot(hc: HardwareClass) -> Iterator[Problem]:
    if not hc.spec.secure_boot:
        return
    if hc.spec.boot_control is not BootControl.systemd_boot:
        yield (("spec", "secureBoot"), "verified boot is built for systemd-boot (signed UKIs per slot); "
                                       f"{hc.spec.boot_control.value} has its own chain of trust")
    if hc.spec.architecture is not Architecture.x86_64:
        yield (("spec", "secureBoot"), "verified boot is x86_64 only so far (the arm64 stub and AAVMF's enrolled "
                                       "variables are not wired up yet)")
    if hc.spec.disk.compression not in ("none", "lz4", "lz4hc"):
        yield (("spec", "disk", "compression"), "verified boot measures each layer's erofs as the device makes "
                                                "it: none, lz4 or lz4hc")


@contract
def execution_providers(hc: HardwareClass) -> Iterator[Problem]:
    rt = hc.spec.runtime
    if hc.stand_in_for is not None:
        # The stand-in's device asks for the class's own providers (checked on the class) and finds them
        # missing from its CPU runtime, as a board whose accelerator is gone would: its fallback decides.
        if rt.name is not RuntimeName.onnxruntime:
            yield (("spec", "runtime", "name"), "a stand-in's runtime is onnxruntime, the CPU build from PyPI")
        return
    allowed = rt.name.execution_providers
    for i, ep in enumerate(rt.execution_providers):
        if ep not in allowed:
            yield (("spec", "runtime", "executionProviders", i),
                   f"{ep} is not provided by {rt.name.value} (it has: {', '.join(allowed)})")


@contract
def models(hc: HardwareClass) -> Iterator[Problem]:
    seen: set[str] = set()
    for i, m in enumerate(hc.spec.models):
        loc: Loc = ("spec", "models", i)
        if m.name in seen:
            yield ((*loc, "name"), f"duplicate model name '{m.name}'")
        seen.add(m.name)
        yield from _model_files(m, loc)
        if m.fetch is not None and not m.source.startswith(".kiln/"):
            yield ((*loc, "source"), f"{m.source}: a fetched model is written by Kiln, so its source must be "
                                     "under .kiln/ (ignored by git), e.g. .kiln/models/NAME.onnx")
        yield from _model_policy(hc, m, loc)


def _model_files(m, loc: Loc) -> Iterator[Problem]:  # type: ignore[no-untyped-def]
    root = project_root()
    files = [("validation", "dataset")] if m.fetch is not None else [("source",), ("validation", "dataset")]
    if m.optimization.calibration is not None:
        files.append(("optimization", "calibration"))
    for key in files:
        rel = m
        for part in key:
            rel = getattr(rel, part)
        path = root / rel
        if key != ("source",) and path.is_dir():
            if not (path / "dataset.json").is_file():
                yield ((*loc, *[_camel(k) for k in key]), f"{rel} is a directory without dataset.json")
        elif not path.is_file():
            yield ((*loc, *[_camel(k) for k in key]), f"file not found: {rel} (relative to {root})")


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p.title() for p in rest)


def _model_policy(hc: HardwareClass, m, loc: Loc) -> Iterator[Problem]:  # type: ignore[no-untyped-def]
    opt, gates = m.optimization, m.gates
    if Candidate.int8_static in opt.candidates and opt.calibration is None:
        yield ((*loc, "optimization", "calibration"), "int8-static needs a calibration dataset")
    wants = {Precision.int8: ("int8-static", "int8-dynamic"), Precision.fp16: ("fp16",)}.get(m.precision)
    if wants and not any(c.value in wants for c in opt.candidates):
        yield ((*loc, "precision"),
               f"pinned to {m.precision.value} but no {m.precision.value} candidate in optimization.candidates")
    envelope_p95 = m.envelope.p95_latency_ms if m.envelope else hc.spec.envelope.p95_latency_ms
    which = "the model's envelope" if m.envelope else "the class envelope"
    if gates.max_p95_latency_ms is not None and gates.max_p95_latency_ms > envelope_p95:
        yield ((*loc, "gates", "maxP95LatencyMs"),
               f"{gates.max_p95_latency_ms} ms is looser than {which} ({envelope_p95} ms)")


@contract
def envelope(hc: HardwareClass) -> Iterator[Problem]:
    spec = hc.spec
    disk, storage = spec.disk, spec.envelope.storage
    need = disk.esp + 2 * disk.root + disk.data
    if need > storage:
        yield (("spec", "disk"),
               f"esp + 2 x root + data = {format_size(need)} does not fit the storage envelope "
               f"({format_size(storage)})")
    total = 0
    for i, m in enumerate(spec.models):
        path = project_root() / m.source
        size = path.stat().st_size if path.is_file() else 0
        total += size
        if size > storage:
            yield (("spec", "models", i, "source"),
                   f"model is {format_size(size)}, larger than the storage envelope ({format_size(storage)})")
        elif size > spec.envelope.ram:
            yield (("spec", "models", i, "source"),
                   f"model is {format_size(size)}, larger than the RAM envelope ({format_size(spec.envelope.ram)})")
    if 0 < total <= storage and total > disk.root:
        yield (("spec", "disk", "root"), f"models ({format_size(total)}) do not fit a root slot")


@contract
def rollout(hc: HardwareClass) -> Iterator[Problem]:
    r = hc.spec.rollout
    for required in (HealthCheck.inference_golden, HealthCheck.agent):
        if required not in r.health_checks:
            yield (("spec", "rollout", "healthChecks"),
                   f"every class checks '{required.value}' before a slot is blessed")
    percents = [s.percent for s in r.stages]
    if percents != sorted(set(percents)) or percents[-1] != 100:
        yield (("spec", "rollout", "stages"), "stage percents must increase and end at 100")
    if r.insecure_registry and not hc.spec.development:
        yield (("spec", "rollout", "insecureRegistry"), "only development classes may pull over plain HTTP")
    if (r.registry is None) != (r.lookaside is None):
        yield (("spec", "rollout", "lookaside" if r.lookaside is None else "registry"),
               "registry and lookaside go together: devices verify every image's signature")


@contract
def access(hc: HardwareClass) -> Iterator[Problem]:
    if hc.spec.development and not hc.spec.access.ssh:
        yield (("spec", "access", "ssh"), "development classes are driven over SSH by tests; set true")
    if not hc.spec.development and hc.spec.access.ssh:
        yield (("spec", "access", "ssh"), "production classes (development: false) ship without an SSH server: "
                                          "a field device is reached through its agent; use a development class "
                                          "for lab access")
