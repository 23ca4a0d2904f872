"""Benchmark disk assembly and boot: image -> disk -> QEMU -> first passing health check.

    .venv/bin/python -m bench.boot [--image REF | --class qemu-x86_64 --version V] [--boots N] [--json PATH]

Figures: disk build time (and each step), image, root filesystem and disk sizes,
then per accelerator (KVM when OVMF runs under it here, and TCG) and per boot:
QEMU start -> SSH answers (when the disk has a key) and QEMU start ->
kiln-health-inference.service active (the golden inference check passed, asked
through the guest agent). A failing check is reported as such, with its time.
For each healthy boot, where its seconds went: firmware (QEMU start -> kernel), the
initramfs, the switch to the real root, when the health gate's units started and became
active (systemd's monotonic timestamps) and `systemd-analyze blame`'s slowest ten.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import describe_machine, failed, make_parser, write_figures
from builder.core import paths
from builder.core.context import make_context
from builder.core.engine import PodmanEngine
from builder.core.errors import KilnError
from builder.core.progress import Steps
from builder.core.run import find_tool
from builder.core.state import make_state_dir
from builder.disk import assemble, vm
from builder.disk.timeline import boot_timeline


def image_size(ref: str) -> int | None:
    engine = PodmanEngine(make_state_dir())
    return engine.inspect(ref)["size"] if engine.exists(ref) else None


def boot_once(image: Path, accel: vm.Accel, key: Path | None, timeout: float,
              plain: vm.Firmware | None = None) -> dict[str, Any]:
    """One boot to healthy. `plain`: with this firmware instead of the disk's own (a verified disk's enrolled,
    Secure Boot enforcing OVMF): what verified boot costs, side by side."""
    cfg = vm.VMConfig(disk=image, accel=accel, snapshot=True, ssh_key=key if key and key.is_file() else None,
                      ovmf_code=plain.code if plain else None, ovmf_vars=plain.vars_template if plain else None)
    row: dict[str, Any] = {"accel": accel.value, "firmware": "plain OVMF" if plain else "the disk's"}
    with vm.start_vm(cfg) as machine:
        row["accel"] = machine.accel.value
        try:
            row["healthy_s"] = round(machine.wait_for_healthy(timeout), 1)
            row["result"] = "healthy"
        except KilnError as exc:
            row["result"] = str(exc).splitlines()[0][:160]
            row["failed_after_s"] = round(time.monotonic() - machine.started, 1)
        if row["result"] == "healthy":
            try:  # a boot that passed stays a pass when its timeline cannot be read
                row["timeline"] = boot_timeline(machine)
            except (KilnError, OSError, ValueError) as exc:
                row["timeline_error"] = str(exc).splitlines()[0][:160]
            else:
                # QEMU start -> the kernel's clock: OVMF and systemd-boot, plus up to the health poll's
                # interval (about 1 s and a guest-agent call), since healthy_s is when the poll saw it.
                health = row["timeline"]["units"][vm.HEALTH_UNIT]["active_s"]
                if health is not None:
                    row["before_kernel_s"] = round(row["healthy_s"] - health, 1)
        if cfg.ssh_key is not None:
            try:
                row["ssh_s"] = round(machine.wait_for_ssh(30), 1)
            except KilnError:
                row["ssh_s"] = None
        machine.kill()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = make_parser("bench.boot", "disk build time, sizes, QEMU start -> healthy (KVM and TCG)")
    ap.add_argument("--image", help="an image ref in Kiln's store (default: the class's newest build)")
    ap.add_argument("--class", dest="cls", default="qemu-x86_64")
    ap.add_argument("--version", help="with --class: which build")
    ap.add_argument("--boots", type=int, default=1, help="boots per accelerator (default 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per boot (default 900)")
    ap.add_argument("--plain-firmware", action="store_true",
                    help="a disk with verified boot: also boot it as many times with plain OVMF (Secure Boot "
                         "not enforced, no SMM), alternating, to show what the firmware's checks cost")
    args = ap.parse_args(argv)

    try:
        ref, version = (args.image, args.version) if args.image else assemble.resolve_source(args.cls, args.version)
        with tempfile.TemporaryDirectory(prefix="kiln-bench-boot-", dir=paths.build_dir()) as tmp:
            out = Path(tmp) / "disk.raw"
            start = time.perf_counter()
            ctx = make_context(steps=Steps(quiet=True))
            record = assemble.make_disk(ctx, ref, output=out, version=version)
            disk_s = time.perf_counter() - start
            key = paths.ssh_key_path(record.class_name)
            arch = vm.finalize_disk_architecture(out)
            fw = vm.find_firmware(arch=arch)
            kvm_why = vm.finalize_accel(vm.Accel.auto, find_tool(arch.qemu_binary), fw, arch)[1]
            boots: list[dict[str, Any]] = []
            for accel in (vm.Accel.kvm, vm.Accel.tcg):
                if accel is vm.Accel.kvm and kvm_why:
                    boots.append({"accel": "kvm", "result": f"not available: {kvm_why}"})
                    continue
                for _ in range(args.boots):
                    boots.append(boot_once(out, accel, key, args.timeout))
                    if args.plain_firmware and record.efivars:
                        boots.append(boot_once(out, accel, key, args.timeout, plain=vm.find_firmware(arch=arch)))
    except KilnError as exc:
        return failed(exc)

    figures: dict[str, Any] = {
        "image": ref, "class": record.class_name, "version": record.version, "architecture": record.architecture,
        "image_size": image_size(ref),
        "disk_build_s": round(disk_s, 1), "disk_steps_s": record.durations,
        "root_erofs_size": record.root_image_size, "disk_size": record.size, "disk_allocated": record.file_size,
        "verified_boot": {"layers": record.layers_digest, "efivars": bool(record.efivars),
                          "uki_size": record.uki_size} if record.efivars else None,
        "boots": boots,
        "machine": describe_machine(),
    }
    mib = 1024**2
    print(f"{'image':<28} {figures['image']}")
    if figures["image_size"]:
        print(f"{'image size':<28} {int(figures['image_size']) / mib:.0f} MiB")
    print(f"{'disk build':<28} {disk_s:.1f} s")
    for step, seconds in record.durations.items():
        print(f"  {step:<46} {seconds:.1f} s")
    print(f"{'root-a (erofs)':<28} {record.root_image_size / mib:.0f} MiB")
    print(f"{'disk (raw, sparse)':<28} {record.size / mib:.0f} MiB, {record.file_size / mib:.0f} MiB allocated")
    if figures["verified_boot"]:
        print(f"{'verified boot':<28} slot A's UKI {(record.uki_size or 0) / mib:.1f} MiB, "
              f"root bound to {record.layers_digest}")
    print(f"\n{'accel':<6} {'firmware':<12} {'QEMU start -> ssh':>18} {'-> healthy':>12}  result")
    for b in boots:
        ssh = f"{b['ssh_s']:.1f} s" if b.get("ssh_s") else "-"
        healthy = f"{b['healthy_s']:.1f} s" if "healthy_s" in b else (
            f"({b['failed_after_s']:.1f} s)" if "failed_after_s" in b else "-")
        print(f"{b['accel']:<6} {b.get('firmware', '-'):<12} {ssh:>18} {healthy:>12}  {b['result']}")
    for firmware in sorted({str(b.get("firmware")) for b in boots if "healthy_s" in b}):
        times = sorted(b["healthy_s"] for b in boots if b.get("firmware") == firmware and "healthy_s" in b)
        if len(times) > 1:
            print(f"{firmware}: median {times[len(times) // 2]:.1f} s, spread {times[0]:.1f}-{times[-1]:.1f} s "
                  f"over {len(times)} boots")
    for b in boots:
        if "timeline" in b:
            print_timeline(b)
        elif "timeline_error" in b:
            print(f"\n{b['accel']}: healthy, but its timeline could not be read: {b['timeline_error']}")
    write_figures(args.json, figures)
    return 0


def print_timeline(boot: dict[str, Any]) -> None:
    """Where one boot's seconds went (seconds since the kernel started, from systemd)."""
    t = boot["timeline"]

    def at(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    loader = "" if t.get("firmware_s") is None and t.get("loader_s") is None else (
        f" (firmware started {at(t.get('firmware_s'))} s and systemd-boot {at(t.get('loader_s'))} s before the kernel,"
        " by systemd-boot's clock)")
    print(f"\nwhere the seconds went ({boot['accel']}): QEMU start -> kernel {at(boot.get('before_kernel_s'))} s, "
          f"up to one health poll (about 1 s) included{loader}; then, since the kernel started:")
    if t["initrd_s"] is not None:  # only when systemd runs in the initramfs (not initramfs-tools)
        print(f"  {'initramfs starts':<34} {at(t['initrd_s']):>8} s")
    print(f"  {'switch to the real root':<34} {at(t['userspace_s']):>8} s")
    print(f"  {'unit':<34} {'started':>8}   {'active':>8}")
    for unit, u in t["units"].items():
        print(f"  {unit:<34} {at(u['started_s']):>8} s {at(u['active_s']):>8} s")
    if t["blame"]:  # systemd-analyze answers only once the boot has finished (every start job done)
        print("  slowest units (systemd-analyze blame):")
        for line in t["blame"]:
            print(f"    {line}")


if __name__ == "__main__":
    raise SystemExit(main())
