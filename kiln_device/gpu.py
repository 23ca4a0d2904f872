"""The gpu-visible health check (kiln-health-gpu): the class's GPU is there and its driver is loaded.

Runs before boot-complete.target on classes whose rollout.healthChecks name gpu-visible
(kiln-health-gpu.service, enabled by the class's preset). It looks, under --root (default /), for

  nvidia-dgpu:   the nvidia kernel module loaded (/sys/module/nvidia*, /proc/driver/nvidia/version),
                 the control node /dev/nvidiactl and at least one /dev/nvidiaN
  nvidia-jetson: the nvgpu module loaded (/sys/module/nvgpu) and its nodes
                 (/dev/nvgpu/igpu0 or /dev/nvhost-ctrl-gpu)

When something is missing, the class's fallback policy (release.json `fallback`,
kiln_device.degraded) decides: `degrade` passes, recording degraded and the reason;
`fail` fails the check, so a trial boot is rolled back.

Result: /var/lib/kiln/health/gpu.json (atomically).

exit codes:
  0   the GPU is visible, or it is not and the class degrades
  1   the GPU is not visible and the class's fallback policy is fail
  3   release.json unreadable or malformed
  64  usage
Standard library only: runs with the system python3.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln_device import degraded as dm
from kiln_device.common import Parser, first_line, make_logger, write_json_atomic
from kiln_device.contract import GPU_HEALTH_RESULT, RELEASE_JSON, parse_release, under

VISIBLE, MISSING, BROKEN, USAGE = 0, 1, 3, 64
RESULT = GPU_HEALTH_RESULT.lstrip("/")
NVIDIA_NODE = re.compile(r"nvidia[0-9]+")

say = make_logger("kiln-health-gpu")


@dataclass
class Probe:
    """What is there and what is missing, as paths on the device."""

    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # /dev/nvidiaN: one per GPU
    driver_version: str | None = None

    @property
    def visible(self) -> bool:
        return not self.missing

    def reason(self) -> str:
        return "no GPU visible: " + "; ".join(self.missing)


def find_nvidia_devices(root: Path) -> list[str]:
    """/dev/nvidiaN, in GPU order (the CDI generator's devices too)."""
    dev = under(root, "/dev")
    try:
        names = [p.name for p in dev.iterdir() if NVIDIA_NODE.fullmatch(p.name)]
    except OSError:
        return []
    return [f"/dev/{n}" for n in sorted(names, key=lambda n: int(n[len("nvidia"):]))]


def driver_version(root: Path) -> str | None:
    """The loaded driver's version from /proc/driver/nvidia/version ("... Kernel Module  535.309.01 ...")."""
    try:
        text = under(root, "/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module(?: for [^ ]+)?\s+([0-9][0-9.]*)", text)
    return m.group(1) if m else "unknown"


def probe_dgpu(root: Path) -> Probe:
    probe = Probe(driver_version=driver_version(root))
    sysmod = under(root, "/sys/module")
    modules = sorted(p.name for p in sysmod.glob("nvidia*")) if sysmod.is_dir() else []
    if "nvidia" in modules or "nvidia_current" in modules or probe.driver_version is not None:
        probe.found.append(f"nvidia module loaded ({probe.driver_version or ', '.join(modules)})")
    else:
        probe.missing.append("the nvidia kernel module is not loaded (no /sys/module/nvidia, "
                             "no /proc/driver/nvidia/version)")
    if under(root, "/dev/nvidiactl").exists():
        probe.found.append("/dev/nvidiactl")
    else:
        probe.missing.append("/dev/nvidiactl is missing")
    probe.devices = find_nvidia_devices(root)
    if probe.devices:
        probe.found.extend(probe.devices)
    else:
        probe.missing.append("no /dev/nvidiaN device node")
    return probe


def probe_jetson(root: Path) -> Probe:
    probe = Probe()
    if under(root, "/sys/module/nvgpu").is_dir():
        probe.found.append("nvgpu module loaded")
    else:
        probe.missing.append("the nvgpu kernel module is not loaded (no /sys/module/nvgpu)")
    nodes = [n for n in ("/dev/nvgpu/igpu0", "/dev/nvhost-ctrl-gpu") if under(root, n).exists()]
    if nodes:
        probe.found.extend(nodes)
    else:
        probe.missing.append("no /dev/nvgpu/igpu0 or /dev/nvhost-ctrl-gpu")
    return probe


PROBES = {"nvidia-dgpu": probe_dgpu, "nvidia-jetson": probe_jetson}


def probe_gpu(root: Path, accelerator: str) -> Probe | None:
    """The probe for the class's accelerator kind (None: not a GPU this check knows)."""
    fn = PROBES.get(accelerator)
    return fn(root) if fn else None


def run_check(root: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"checked_at": datetime.now(UTC).isoformat(timespec="seconds"), "root": str(root)}
    try:
        release = parse_release(json.loads(under(root, RELEASE_JSON).read_text()), RELEASE_JSON)
        fallback = dm.parse_fallback(release)
    except (OSError, ValueError) as exc:
        return {**result, **dm.state(False, None, root), "exit_code": BROKEN, "status": "release-unreadable",
                "problem": f"{RELEASE_JSON}: {first_line(exc)}"}
    accelerator = release.accelerator
    result.update(accelerator=accelerator, policy=fallback.policy)
    probe = probe_gpu(root, accelerator)
    if probe is None:
        return {**result, **dm.state(False, None, root), "exit_code": VISIBLE, "status": "not-applicable",
                "visible": None, "problem": f"the class's accelerator is {accelerator}: no GPU to look for"}
    result.update(visible=probe.visible, found=probe.found, missing=probe.missing, devices=probe.devices,
                  driver_version=probe.driver_version)
    if probe.visible:
        return {**result, **dm.state(False, None, root), "exit_code": VISIBLE, "status": "visible"}
    if fallback.degrades:
        return {**result, **dm.state(True, probe.reason(), root), "exit_code": VISIBLE, "status": "degraded"}
    return {**result, **dm.state(False, None, root), "exit_code": MISSING, "status": "gpu-missing",
            "problem": f"{probe.reason()}; the class's fallback policy is fail"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="kiln-health-gpu", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, usage_code=USAGE)
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="tree holding usr/lib/kiln/release.json, dev/, sys/ and proc/ (default /)")
    parser.add_argument("--output", type=Path, default=None, help=f"result file (default ROOT/{RESULT})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: not a directory")
    args.output = args.output or under(args.root, RESULT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_check(args.root)
    try:
        write_json_atomic(args.output, result)
    except OSError as exc:
        say(f"warning: cannot write {args.output}: {first_line(exc)}")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    if result.get("found"):
        say("found: " + ", ".join(result["found"]))
    if result.get("degraded"):
        say(f"degraded: {result['degraded_reason']} (the class's fallback policy is degrade)")
    if result.get("problem"):
        say(("FAIL: " if result["exit_code"] else "") + result["problem"])
    say(f"{result['status']} (exit {result['exit_code']})")
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
