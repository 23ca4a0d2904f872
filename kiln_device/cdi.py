"""kiln-cdi: write this boot's NVIDIA CDI spec, without nvidia-container-toolkit.

Run at boot by kiln-nvidia-cdi.service (NVIDIA dGPU classes). A Container Device Interface
spec (https://github.com/cncf-tags/container-device-interface, cdiVersion 0.6.0) lets podman
or containerd hand a container `--device nvidia.com/gpu=0` (or `=all`):

  devices        one per /dev/nvidiaN (named N), plus `all`
  containerEdits the control nodes present (/dev/nvidiactl, /dev/nvidia-uvm,
                 /dev/nvidia-uvm-tools, /dev/nvidia-modeset), read-only bind mounts of the
                 driver's user-space libraries (the files under
                 /usr/lib/<multiarch>/nvidia/current/, and the /usr/lib/<multiarch>/lib*.so.N
                 links that lead into it, mounted at the link's path) and nvidia-smi

It is generated from what this boot has, never baked: the device nodes exist only once the
driver is loaded. JSON is written (CDI reads .json and .yaml from /run/cdi). With no GPU
no spec is written (a stale one is removed) and /run/kiln/cdi.json records why: that is not
a failure here, the gpu-visible health check decides what a missing GPU means.

Exit codes: 0 written or nothing to write, 1 cannot write, 64 usage. Standard library only.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

from kiln_device.common import Parser, first_line, make_logger, write_json_atomic
from kiln_device.contract import CDI_SPEC, CDI_STATUS, under
from kiln_device.gpu import driver_version, find_nvidia_devices
from kiln_device.tree import resolve_in_tree

CDI_VERSION = "0.6.0"
KIND = "nvidia.com/gpu"
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
NVIDIA_SMI = "/usr/bin/nvidia-smi"
MOUNT_OPTIONS = ["ro", "nosuid", "nodev", "bind"]
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 64

log = make_logger("kiln-cdi")


def multiarch(machine: str | None = None) -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine or platform.machine(),
                                                                             "x86_64-linux-gnu")


def _inside(root: Path, path: Path) -> str:
    """A path under `root` as the device path it stands for."""
    return "/" + str(path.relative_to(root)) if path != root else "/"


def find_mounts(root: Path, arch: str) -> list[tuple[str, str]]:
    """(host path, container path) for the driver's libraries and nvidia-smi, links resolved inside `root`."""
    libdir = f"/usr/lib/{arch}"
    driver_dir = f"{libdir}/nvidia/current"
    mounts: dict[str, str] = {}  # container path -> host path
    real_dir = under(root, driver_dir)
    if real_dir.is_dir():
        for p in sorted(real_dir.iterdir()):
            if p.is_file() and not p.is_symlink() and ".so" in p.name:
                mounts[f"{driver_dir}/{p.name}"] = f"{driver_dir}/{p.name}"
    top = under(root, libdir)
    if top.is_dir():
        for p in sorted(top.iterdir()):
            if not p.is_symlink() or ".so" not in p.name:
                continue
            target = _inside(root, resolve_in_tree(root, f"{libdir}/{p.name}"))
            if target.startswith(driver_dir + "/") and under(root, target).is_file():
                mounts[f"{libdir}/{p.name}"] = target
    smi = resolve_in_tree(root, NVIDIA_SMI)
    if smi.is_file():
        mounts[NVIDIA_SMI] = _inside(root, smi)
    return [(host, container) for container, host in sorted(mounts.items())]


def finalize_spec(root: Path, arch: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """The CDI spec for what is under `root`, or (None, why there is none)."""
    gpus = find_nvidia_devices(root)
    if not gpus:
        return None, "no /dev/nvidiaN device node: no NVIDIA GPU visible (or its driver is not loaded)"
    control = [n for n in CONTROL_NODES if under(root, n).exists()]
    devices = [{"name": g[len("/dev/nvidia"):], "containerEdits": {"deviceNodes": [{"path": g}]}} for g in gpus]
    devices.append({"name": "all", "containerEdits": {"deviceNodes": [{"path": g} for g in gpus]}})
    mounts = [{"hostPath": h, "containerPath": c, "options": MOUNT_OPTIONS}
              for h, c in find_mounts(root, arch or multiarch())]
    edits: dict[str, Any] = {"deviceNodes": [{"path": n} for n in control]}
    if mounts:
        edits["mounts"] = mounts
    return {"cdiVersion": CDI_VERSION, "kind": KIND, "devices": devices, "containerEdits": edits}, None


def make_spec(root: Path, spec_path: Path, status_path: Path, arch: str | None = None) -> dict[str, Any]:
    """Write the spec (or remove a stale one) and the status record; the record."""
    spec, why = finalize_spec(root, arch)
    record: dict[str, Any] = {"spec": str(spec_path), "written": spec is not None, "reason": why,
                              "driver_version": driver_version(root)}
    if spec is None:
        spec_path.unlink(missing_ok=True)
    else:
        write_json_atomic(spec_path, spec)
        record["devices"] = [d["name"] for d in spec["devices"]]
        record["mounts"] = len(spec["containerEdits"].get("mounts", []))
    write_json_atomic(status_path, record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="kiln-cdi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    usage_code=EXIT_USAGE)
    parser.add_argument("--root", type=Path, default=Path("/"), help="tree holding dev/, usr/, proc/ (default /)")
    parser.add_argument("--output", type=Path, default=None, help=f"the spec (default ROOT{CDI_SPEC})")
    parser.add_argument("--status", type=Path, default=None, help=f"the record (default ROOT{CDI_STATUS})")
    parser.add_argument("--arch", default=None, help="the multiarch triplet's machine (default: this one's)")
    args = parser.parse_args(argv)
    spec_path = args.output or under(args.root, CDI_SPEC)
    status_path = args.status or under(args.root, CDI_STATUS)
    try:
        record = make_spec(args.root, spec_path, status_path, multiarch(args.arch) if args.arch else None)
    except OSError as exc:
        log(f"error: {first_line(exc)}")
        return EXIT_FAILED
    if record["written"]:
        log(f"wrote {spec_path}: devices {', '.join(record['devices'])}, {record['mounts']} library mounts")
    else:
        log(f"no CDI spec: {record['reason']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
