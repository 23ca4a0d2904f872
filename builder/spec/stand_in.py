"""A class's stand-in: the class without its vendor's board support package, built here for QEMU.

    hc = load_class("jetson-vision-standard-stand-in")  # images/jetson-vision-standard.yaml, spec.standIn
    hc.stand_in_for                                      # "jetson-vision-standard"

A vendor class (Jetson: NVIDIA's L4T base, kernel, driver, container toolkit, Jetson wheels and
nvbootctrl) cannot be built where the vendor's repositories are out of reach, and its boot control
cannot run in QEMU. Its `spec.standIn` names what stands in for those: a Debian base, a kernel, a CPU
runtime from PyPI (and the packages). Everything else is the class's own: the agent, the health
checks (gpu-visible included), the models with their gates, the rollout, and the accelerator's kind
and fallback policy. The device asks for the class's execution providers, finds the accelerator
missing and does what `fallback.policy` says, as a board whose accelerator is gone would.

A stand-in is named `<class>-stand-in`, is compatible with `<vendor>,<class>-stand-in` only (a device
of the class refuses it) and is a development class (a production device refuses it too): it exists
to boot, update and roll back the rest of the class in QEMU, never to ship.
"""

from __future__ import annotations

from typing import Any

from builder.core.locations import Loc
from builder.spec.schema import BootControl, HardwareClass

SUFFIX = "-stand-in"
# What spec.standIn replaces, each by its own key under standIn (the runtime keeps the class's providers).
REPLACED = ("base", "kernel", "runtime", "packages")
# What the stand-in leaves out, because only the vendor's stack provides it.
LEFT_OUT = (("repositories",), ("accelerator", "driver"), ("accelerator", "toolkit"), ("runtime", "extras"))


def stand_in_target(ref: str) -> str | None:
    """The class a stand-in's name stands in for ('jetson-vision-standard-stand-in' -> 'jetson-vision-standard')."""
    if ref.endswith(SUFFIX) and "/" not in ref and len(ref) > len(SUFFIX):
        return ref.removesuffix(SUFFIX)
    return None


def finalize_stand_in_data(hc: HardwareClass) -> dict[str, Any]:
    """The stand-in's class document (camelCase, as in YAML), from a validated class with spec.standIn."""
    assert hc.spec.stand_in is not None
    data = hc.model_dump(by_alias=True, mode="json")
    spec, stand_in, meta = data["spec"], data["spec"].pop("standIn"), data["metadata"]
    name = f"{hc.name}{SUFFIX}"
    meta["name"] = name
    meta["description"] = f"{hc.name} without its vendor board support package, for QEMU"
    meta["extends"] = None  # merged already
    spec["compatible"] = f"{hc.metadata.vendor},{name}"
    spec["development"] = True  # a production device refuses development images
    spec["access"] = {"ssh": True}
    spec["bootControl"] = BootControl.systemd_boot.value
    spec["base"] = stand_in["base"]
    spec["kernel"] = stand_in["kernel"]
    spec["packages"] = stand_in.get("packages", [])
    spec["repositories"] = []
    runtime = spec["runtime"]
    spec["runtime"] = {**stand_in["runtime"], "executionProviders": runtime["executionProviders"],
                       "device": runtime["device"]}
    spec["accelerator"].update(driver=None, toolkit=None)
    return data


def finalize_stand_in_lines(lines: dict[Loc, str]) -> dict[Loc, str]:
    """The class's YAML locations, with spec.standIn's keys where the stand-in takes them from there."""
    out = dict(lines)
    for loc, at in lines.items():
        if loc[:2] == ("spec", "standIn") and len(loc) > 2 and loc[2] in REPLACED:
            out[("spec", *loc[2:])] = at
    return out
