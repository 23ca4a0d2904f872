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

import shutil
import tempfile
from pathlib import Path

from builder.base import make_base_for_class
from builder.context import Context
from builder.emulation import check_emulation, needs_emulation
from builder.errors import BuildError, KilnError
from builder.model.runtimes import Container
from builder.pins import make_checked_wheelhouse
from builder.spec import BaseSource, Family, HardwareClass
from builder.wheels import render_locked_requirements

GATE_PYTHON = "/opt/kiln-gate/venv/bin/python"
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
    return Container(image=ref, python=GATE_PYTHON, platform=platform, isa=hc.spec.architecture.value,
                     env=ctx.state.engine_env(), emulated=needs_emulation(hc.spec.architecture))
