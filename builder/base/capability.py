"""Can this machine build a class? Every reason it cannot, in plain words."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from builder.base.emulation import why_not_emulated
from builder.core.net import reachable
from builder.core.run import have_tool, run
from builder.spec import names
from builder.spec.schema import BaseSource, BootControl, Family, HardwareClass
from builder.spec.stand_in import SUFFIX


def why_not_buildable(hc: HardwareClass, *, probe_network: bool = True, tools: bool = True) -> list[str]:
    """Every reason this machine cannot build `hc`; `tools=False` leaves out missing host tools
    (the build raises ToolMissing for those where they are actually needed)."""
    spec = hc.spec
    reasons = []
    emulation = why_not_emulated(spec.architecture)  # it names the host's architecture and what is missing
    if emulation is not None:
        reasons.append(emulation)
    if tools and not (have_tool("podman") or have_tool("buildah")):
        reasons.append("no OCI engine: install podman (apt-get install podman runc)")
    if spec.base.source is BaseSource.bootstrap and spec.base.family is not Family.debian:
        reasons.append(f"a {spec.base.family.value} base: Kiln bootstraps Debian bases only "
                       f"({spec.base.release or 'no release'} would come from {spec.base.mirror or 'its mirror'})")
    if spec.boot_control is BootControl.nvbootctrl:
        reasons.append("boot control nvbootctrl: the agent's Jetson A/B backend (UEFI capsules, nvbootctrl) "
                       "is not implemented, so no device could take an update")
    if tools and spec.base.source is BaseSource.bootstrap and not have_tool("mmdebstrap"):
        reasons.append("bootstrap base needs mmdebstrap (apt-get install mmdebstrap)")
    if spec.base.source is BaseSource.registry and not _image_present(hc):
        reasons.append(f"base {spec.base.image} is not in local storage and needs a registry to pull from")
    urls = [r.url for r in spec.repositories]
    if spec.runtime.index:
        urls.append(spec.runtime.index)
    base_urls = finalize_base_urls(hc)
    if probe_network and (urls or base_urls):
        with ThreadPoolExecutor(max_workers=8) as pool:
            ok = dict(zip(base_urls + urls, pool.map(reachable, base_urls + urls), strict=True))
        if base_urls and not any(ok[u] for u in base_urls):
            alternatives = " or ".join(f"{urlsplit(u).hostname} ({u})" for u in base_urls)
            reasons.append(f"base mirror: needs {alternatives}, unreachable from here")
        reasons.extend(f"needs {urlsplit(u).hostname} ({u}), unreachable from here" for u in urls if not ok[u])
    if reasons and spec.stand_in is not None and not why_not_emulated(spec.architecture):
        reasons.append(f"{hc.name}{SUFFIX} builds the rest of the class here, for QEMU (spec.standIn)")
    return reasons


def finalize_base_urls(hc: HardwareClass) -> list[str]:
    """The mirrors a bootstrap base may come from, preferred first: the snapshot's (or spec.base.mirror),
    then spec.base.fallbackMirror. Empty: Debian's default mirror, not probed."""
    from builder.base.mirrors import finalize_mirrors

    base = hc.spec.base
    if base.source is not BaseSource.bootstrap or not (base.mirror or base.snapshot):
        return []
    fallback = [base.fallback_mirror] if base.fallback_mirror else []
    return [base.mirror or finalize_mirrors(None, base.snapshot)[0], *fallback]


def finalize_notes(hc: HardwareClass, *, probe_network: bool = True) -> list[str]:
    """What a build here would do differently from the spec's first choice (a fallback base mirror)."""
    from builder.base.mirrors import finalize_base_mirror

    if hc.spec.base.source is not BaseSource.bootstrap or not probe_network:
        return []
    note = finalize_base_mirror(hc).note
    return [note] if note else []


def _image_present(hc: HardwareClass) -> bool:
    if not have_tool("podman") or hc.spec.base.image is None:
        return False
    return run(["podman", "image", "exists", names.base_ref(hc)], check=False, quiet=True).returncode == 0
