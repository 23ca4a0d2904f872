"""The class's inference runtime on its own ISA, for the model gate: a small image of the class's
architecture, run by podman (under qemu-user when this host is another architecture).

    ref = make_runtime_image(ctx, hc, source)     # localhost/kiln/<class>/gate-runtime:<key>

INT8 kernels differ between x86 and arm64 (onnxruntime #20479, #28609): a model released for an
arm64 class is validated on arm64, and the golden outputs its devices replay come from that run
(builder.model.runtimes.Container). The image is the class's own offline base, its Python, and the
class's runtime wheelhouse (the same bytes the device image installs, by hash), in a venv. Podman's
layer cache makes it once per base and wheel set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from builder.base.bootstrap import make_base_for_class
from builder.base.emulation import EMULATED_CPU, check_emulation, needs_emulation
from builder.base.pins import make_checked_wheelhouse
from builder.base.wheels import render_locked_requirements
from builder.core.context import Context
from builder.core.errors import BuildError, KilnError
from builder.core.run import run
from builder.model.runtimes import Container
from builder.spec.schema import Architecture, BaseSource, Family, HardwareClass

GATE_PYTHON = "/opt/kiln-gate/venv/bin/python"
# qemu-user (7.2, Debian 12) shows an arm64 program the host's own /proc/cpuinfo, in x86's format;
# onnxruntime's CPU detection (pytorch/cpuinfo) finds no arm64 core in it and crashes in a thread at
# import (SIGSEGV, then a hang). The gate's container gets a /proc/cpuinfo in arm64's format instead:
# one entry per host CPU (qemu-user runs the guest's threads on them), with the features the emulated
# CPU reports in its own AT_HWCAP (read inside the container from /proc/self/auxv, which qemu-user
# emulates). onnxruntime's kernels choose by AT_HWCAP, not by this text.
HWCAP_NAMES = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp",
               "asimdhp", "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4",
               "asimddp", "sha512", "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb",
               "paca", "pacg")  # Linux's HWCAP_* bits 0-31, in order
AT_HWCAP = 16
READ_HWCAP = ("import struct; d = open('/proc/self/auxv', 'rb').read(); "
              "a = dict(struct.iter_unpack('<QQ', d[: len(d) // 16 * 16])); print(a.get(16, 0))")
CONTAINERFILE = """\
# The model gate's runtime for {cls}: its base, its Python, its runtime wheels (by hash). Not a device image.
FROM {base}
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv \\
 && apt-get clean \\
 && rm -rf /var/lib/apt/lists/*
COPY wheels/ /opt/kiln-gate/wheels/
COPY requirements.txt /opt/kiln-gate/requirements.txt
RUN python3 -m venv /opt/kiln-gate/venv \\
 && /opt/kiln-gate/venv/bin/pip install --quiet --disable-pip-version-check --no-index \\
      --find-links /opt/kiln-gate/wheels --require-hashes --requirement /opt/kiln-gate/requirements.txt \\
 && rm -rf /opt/kiln-gate/wheels
"""


def want_runtime_image(hc: HardwareClass) -> bool:
    """The gate measures on the class's ISA in an image when this host is another architecture."""
    return needs_emulation(hc.spec.architecture)


def why_no_runtime_image(hc: HardwareClass) -> str | None:
    """Why the gate cannot run the class's runtime on its ISA here (None: it can)."""
    base = hc.spec.base
    if base.source is not BaseSource.bootstrap or base.family is not Family.debian:
        return (f"the gate runs {hc.spec.architecture.value} models in an image of the class's Debian base; "
                f"this class's base is {base.family.value} {base.source.value}")
    return None


def runtime_image_ref(hc: HardwareClass, wheelhouse: Path) -> str:
    return f"localhost/kiln/{hc.name}/gate-runtime:{wheelhouse.name}"


def make_runtime_image(ctx: Context, hc: HardwareClass, source: str) -> Container:
    """Build (or reuse, through the layer cache) the gate's runtime image; what runs the worker in it."""
    why = why_no_runtime_image(hc)
    if why is not None:
        raise BuildError(f"{hc.name}: {why}")
    check_emulation(hc.spec.architecture)
    wheelhouse = make_checked_wheelhouse(hc, ctx.state, source)
    base = make_base_for_class(ctx, hc)
    ref = runtime_image_ref(hc, wheelhouse)
    platform = hc.spec.architecture.oci_platform
    ctx.state.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.state.tmp_dir, prefix="gate-runtime-") as tmp:
        context = Path(tmp)
        (context / "wheels").mkdir()
        for wheel in sorted(wheelhouse.glob("*.whl")):
            shutil.copyfile(wheel, context / "wheels" / wheel.name)
        (context / "requirements.txt").write_text(render_locked_requirements(wheelhouse))
        (context / "Containerfile").write_text(CONTAINERFILE.format(cls=hc.name, base=base.ref))
        try:
            with ctx.steps.step(f"the gate's {hc.spec.runtime.name.value} runtime for {platform}"):
                ctx.engine.build(context, context / "Containerfile", ref, {}, None, platform=platform)
        except KilnError as exc:
            raise exc.with_context(f"making the model gate's {hc.spec.architecture.value} runtime") from exc.__cause__
    emulated = needs_emulation(hc.spec.architecture)
    cpu = EMULATED_CPU[hc.spec.architecture] if emulated else None
    arm = hc.spec.architecture is Architecture.aarch64
    cpuinfo = make_cpuinfo(ctx, ref, platform, cpu) if emulated and arm else None
    return Container(image=ref, python=GATE_PYTHON, platform=platform, isa=hc.spec.architecture.value,
                     env=ctx.state.engine_env(), emulated=emulated, cpuinfo=cpuinfo, cpu=cpu)


def render_cpuinfo(hwcap: int, cpus: int) -> str:
    """/proc/cpuinfo as an arm64 kernel writes it, for CPUS cores with the features in HWCAP."""
    features = " ".join(name for bit, name in enumerate(HWCAP_NAMES) if hwcap >> bit & 1)
    core = ("BogoMIPS\t: 125.00\nFeatures\t: {features}\nCPU implementer\t: 0x00\nCPU architecture: 8\n"
            "CPU variant\t: 0x0\nCPU part\t: 0x051\nCPU revision\t: 0\n")
    return "".join(f"processor\t: {n}\n" + core.format(features=features) + "\n" for n in range(cpus))


def make_cpuinfo(ctx: Context, ref: str, platform: str, cpu: str | None) -> Path:
    """The arm64 /proc/cpuinfo the gate's container sees (see HWCAP_NAMES), from the emulated CPU's AT_HWCAP."""
    try:
        out = run(["podman", "run", "--rm", "--pull", "never", "--platform", platform, "--network", "none",
                   *(["--env", f"QEMU_CPU={cpu}"] if cpu else []), ref, "python3", "-I", "-c", READ_HWCAP],
                  env=ctx.state.engine_env(), capture=True, quiet=True)
        hwcap = int(out.stdout.decode().strip())
    except (KilnError, ValueError) as exc:
        raise BuildError(f"reading the emulated CPU's features in {ref}: {exc}") from None
    path = ctx.state.root / "gate" / f"cpuinfo-{platform.replace('/', '-')}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(render_cpuinfo(hwcap, os.cpu_count() or 1))
    tmp.replace(path)  # another build may be reading it
    return path
