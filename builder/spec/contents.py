"""What an image contains, said once: `kiln list`, the image's labels and build.json's `contents`.

An image that silently lacks what its spec asks for is a defect: every component is named here with
its version, and an absent one (no container toolkit) says "absent" rather than nothing. The kernel
release the modules were built for is only known once the image is built (build.py adds it from the
image's own labels; the nvidia-vermagic lint proved the modules match it inside the build).
"""

from __future__ import annotations

from typing import Any

from builder.spec.rules import finalize_cuda_major
from builder.spec.schema import HardwareClass, ModuleBuild, Toolkit

ABSENT = "absent"
LABEL_DRIVER = "dev.kiln.driver"  # name=version, or "none"
LABEL_KERNEL_MODULES = "dev.kiln.kernel-modules"  # image|prebuilt:<modules>, or "none"
LABEL_TOOLKIT = "dev.kiln.toolkit"  # name=version, or "absent"
LABEL_CDI = "dev.kiln.cdi"  # <mode>:<what generates it>, or "none"
LABEL_CUDA = "dev.kiln.cuda"  # the CUDA major of the runtime's wheels (CUDA runtimes only)
LABEL_EXECUTION_PROVIDERS = "dev.kiln.execution-providers"


def finalize_contents(hc: HardwareClass) -> dict[str, Any]:
    """The image's components from its spec (build.py adds `kernel` and the driver's `builtFor`)."""
    acc, rt = hc.spec.accelerator, hc.spec.runtime
    driver = acc.driver
    toolkit = acc.toolkit
    return {
        "accelerator": acc.kind.value,
        "driver": None if driver is None else {
            "name": driver.name, "version": driver.version, "upstreamVersion": driver.upstream_version,
            "branch": driver.branch, "packages": list(driver.packages),
            "kernelModules": driver.kernel_modules.value, "modules": list(driver.modules),
            "builtFor": None,
        },
        "toolkit": ({"name": toolkit.name, "version": toolkit.version, "source": toolkit.source.value,
                     "repository": toolkit.repository}
                    if toolkit is not None and toolkit.installed else ABSENT),
        "cdi": None if toolkit is None else {"mode": toolkit.cdi.value, "generator": finalize_cdi_generator(toolkit)},
        "runtime": {"name": rt.name.value, "version": rt.version, "extras": list(rt.extras),
                    "executionProviders": list(rt.execution_providers), "cudaMajor": finalize_cuda_major(rt)},
        "kernel": None,
    }


def finalize_cdi_generator(toolkit: Toolkit | None) -> str | None:
    if toolkit is None or toolkit.cdi.value == "none":
        return None
    return "nvidia-ctk" if toolkit.installed else "kiln-cdi"


def finalize_content_labels(hc: HardwareClass) -> dict[str, str]:
    c = finalize_contents(hc)
    driver, toolkit, cdi, rt = c["driver"], c["toolkit"], c["cdi"], c["runtime"]
    labels = {
        LABEL_DRIVER: f"{driver['name']}={driver['version']}" if driver else "none",
        LABEL_KERNEL_MODULES: (f"{driver['kernelModules']}:{','.join(driver['modules'])}"
                               if driver and driver["kernelModules"] != ModuleBuild.none.value else "none"),
        LABEL_TOOLKIT: f"{toolkit['name']}={toolkit['version']}" if isinstance(toolkit, dict) else ABSENT,
        LABEL_CDI: f"{cdi['mode']}:{cdi['generator']}" if cdi and cdi["generator"] else "none",
        LABEL_EXECUTION_PROVIDERS: ",".join(rt["executionProviders"]),
    }
    if rt["cudaMajor"] is not None:
        labels[LABEL_CUDA] = str(rt["cudaMajor"])
    return labels


def finalize_summary(hc: HardwareClass) -> str:
    """One line for `kiln list`: driver, modules, toolkit, CUDA."""
    labels = finalize_content_labels(hc)
    parts = []
    if labels[LABEL_DRIVER] != "none":
        parts.append(f"driver {labels[LABEL_DRIVER]} (modules: {labels[LABEL_KERNEL_MODULES].split(':')[0]})")
    if hc.spec.accelerator.toolkit is not None:
        parts.append(f"toolkit {labels[LABEL_TOOLKIT]}, CDI {labels[LABEL_CDI]}")
    if LABEL_CUDA in labels:
        parts.append(f"CUDA {labels[LABEL_CUDA]}")
    return "; ".join(parts)
