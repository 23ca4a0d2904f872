"""Benchmark over-the-air updates of a class (default: the embedded default) on a QEMU device.

    .venv/bin/python -m bench.ota [--class qemu-x86_64|arm64-vision] [--json PATH] [--timeout S]

Real builds (podman, Kiln's state dir), a registry and signature server on 127.0.0.1
(`running_registry`), the release key the image trusts, one disk made from v1 and one
QEMU device (TCG here) that lives through four releases:

1. a model-only release (new model bytes, same graph),
2. a model-only release of realistic size: the model widened to 8 MiB of weights (INT8 about
   2 MiB once gated), the same answers (bench.projects.make_widened_project),
3. an OS package release (one more Debian package in the class, the first model),
4. a bad release (its golden inference check fails on the device).

Figures:
- bytes over the wire per update, from the registry's own log (`http.response.written` of
  every GET: manifests, configs, layers), against the full image a fresh device would pull
  and against the layers that changed (the floor);
- time from `kiln-agent update` starting to the new slot blessed (healthy, its boot
  entry without a tries counter), split at the reboot;
- time from the bad update starting to the device back on the good slot and healthy,
  after its trial boots failed;
- bytes written to the device's disk per update (QEMU's block statistics of the guest's disk,
  from `update` to the new boot), and the image's size compressed and uncompressed;
- a reboot with no update, measured the same way: the floor of an update's time, and what
  any boot writes, which the figures also show each update's writes beyond;
- what an update of any one installed Debian source package would download from v1's rechunked
  OS layers (builder.image.rechunk): median, 90th percentile and largest, from the pushed sizes.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    describe_machine,
    failed,
    make_parser,
    manifest,
    mb,
    print_rows,
    registry_bytes,
    write_figures,
)
from bench.projects import (
    make_broken_golden_project,
    make_package_project,
    make_retrained_project,
    make_widened_project,
    project_dir,
)
from builder.core.context import Context, make_context
from builder.core.engine import PodmanEngine
from builder.core.errors import KilnError, VMError
from builder.core.state import StateDir, make_state_dir
from builder.disk import assemble, vm
from builder.image.build import build_class
from builder.keys.release_key import SigningKey, resolve_signing_key
from builder.release.publish import push_signed
from builder.release.registry import RegistryInfo, running_registry
from builder.spec.loader import load_class

CLS = "qemu-x86_64"  # the default class (--class)
V1, MODEL, LARGE, PACKAGE, BAD = "2.0.0", "2.0.1", "2.0.2", "2.1.0", "2.1.1"


def context(state: StateDir) -> Context:
    return make_context(PodmanEngine(state), state=state)


def build(state: StateDir, version: str, project: Path | None, cls: str = CLS) -> dict[str, Any]:
    with project_dir(project) as proj:
        hc = load_class(cls, proj / "images")
        return build_class(context(state), hc, source=f"images/{hc.file_name}", version=version)


def release(state: StateDir, info: RegistryInfo, key: SigningKey, signatures: Path, version: str,
            project: Path | None, cls: str = CLS) -> dict[str, Any]:
    with project_dir(project):
        return push_signed(context(state), cls, version, info.address, key=key, lookaside_dir=signatures,
                           channel="stable", tls_verify=False)


def image_bytes(mf: dict[str, Any]) -> int:
    return sum(layer["size"] for layer in mf["layers"]) + mf["config"]["size"] + len(json.dumps(mf).encode())


def changed_bytes(old: dict[str, Any], new: dict[str, Any]) -> int:
    """The floor of an update: the new image's layers the old one lacks, its config and manifest."""
    have = {layer["digest"] for layer in old["layers"]}
    return sum(layer["size"] for layer in new["layers"] if layer["digest"] not in have) + new["config"]["size"] \
        + len(json.dumps(new).encode())


def changed_groups(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    have = {layer["diffId"] for layer in old["layers"]}
    return sorted({layer["group"] for layer in new["layers"] if layer["diffId"] not in have})


def changed_os_layers(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The rechunked OS layers (builder.image.rechunk) of NEW that OLD lacks, by name."""
    have = {layer["diffId"] for layer in old["layers"]}
    return [layer["name"] for layer in new.get("osStage", {}).get("layers", []) if layer["diffId"] not in have]


def one_package_updates(record: dict[str, Any], mf: dict[str, Any]) -> dict[str, Any]:
    """What an update of any one installed Debian source package would download from this image: the
    compressed layer that holds it (builder.image.rechunk), `rest` (dpkg's status moves with every update),
    the config and the manifest. From the pushed manifest's sizes, not a transfer: a release of every
    package cannot be built here (one is measured: the OS package update)."""
    table = record.get("osStage", {}).get("layers", [])
    if not table:
        return {}
    size = {layer["diffId"]: pushed["size"] for layer, pushed in zip(record["layers"], mf["layers"], strict=True)}
    fixed = size[table[-1]["diffId"]] + mf["config"]["size"] + len(json.dumps(mf).encode())
    per_source = {src: size[layer["diffId"]] + fixed for layer in table[:-1] for src in layer["sources"]}
    ranked = sorted(per_source.values())
    full = image_bytes(mf)
    return {"sources": len(ranked), "median_bytes": ranked[len(ranked) // 2],
            "p90_bytes": ranked[int(len(ranked) * 0.9)], "max_bytes": ranked[-1],
            "max_source": max(per_source, key=lambda s: per_source[s]),
            "at_most_5_percent": sum(1 for b in ranked if b <= 0.05 * full) / len(ranked),
            "layers": len(table), "rest_bytes": size[table[-1]["diffId"]]}


def guest(machine: vm.VM, command: str, timeout: float = 60) -> str:
    """A shell line through the guest agent; '' while the guest is rebooting."""
    with contextlib.suppress(OSError, ValueError, VMError):
        return machine.guest_exec(command, check=False, timeout=timeout).stdout
    return ""


def wait(what: str, probe: Callable[[], bool], timeout: float, machine: vm.VM) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not machine.running:
            raise machine.error(f"QEMU exited while waiting for {what}")
        if probe():
            return time.monotonic() - start
        time.sleep(2)
    raise machine.error(f"no {what} within {timeout:.0f} s")


def on_slot(machine: vm.VM, slot: str, entry: str | None = None) -> bool:
    """Healthy (golden check passed) on SLOT, and ENTRY (the blessed name) present when given."""
    if machine.healthy_slot() != slot:
        return False
    return entry is None or entry in guest(machine, "ls /efi/loader/entries").split()


def update(machine: vm.VM, info: RegistryInfo, version: str, slot: str, *, bad: bool, timeout: float,
           good_slot: str) -> dict[str, Any]:
    mark = registry_bytes(info)
    boot_id = guest(machine, "cat /proc/sys/kernel/random/boot_id").strip()
    boots = machine.console_text().count("Linux version")
    written = machine.disk_bytes_written()
    start = time.monotonic()
    guest(machine, "systemd-run --unit kiln-bench-update --collect kiln-agent update")
    row: dict[str, Any] = {}
    row["install_s"] = round(wait("the reboot into the new slot", lambda: (
        (b := guest(machine, "cat /proc/sys/kernel/random/boot_id", timeout=10).strip()) != "" and b != boot_id),
        timeout, machine), 1)
    # the guest reboots in the same QEMU (no -no-reboot): its counter covers the whole install
    row["disk_written_bytes"] = machine.disk_bytes_written() - written
    if bad:
        row["back_on_good_slot_s"] = round(time.monotonic() - start + wait(
            "a healthy boot of the good slot", lambda: on_slot(machine, good_slot), timeout, machine), 1)
        st = json.loads(guest(machine, "kiln-agent status --json") or "{}")
        row["rolled_back"] = [rb["version"] for rb in st.get("rollbacks", [])]
        row["boots"] = machine.console_text().count("Linux version") - boots  # trials, then the good slot
    else:
        row["blessed_s"] = round(time.monotonic() - start + wait(
            "the new slot blessed", lambda: on_slot(machine, slot, f"kiln-{version}-{slot}.conf"), timeout, machine), 1)
    time.sleep(3)  # the agent's boot reconciliation has nothing more to fetch; let the log settle
    row["wire_bytes"] = registry_bytes(info) - mark
    return row


def plain_reboot(machine: vm.VM, slot: str, timeout: float) -> dict[str, Any]:
    """A reboot with no update, measured as `update` measures an update: the floor of an update's
    time (it reboots too) and what any boot writes (the journal, the agent's boot records)."""
    boot_id = guest(machine, "cat /proc/sys/kernel/random/boot_id").strip()
    written = machine.disk_bytes_written()
    start = time.monotonic()
    guest(machine, "systemd-run --unit kiln-bench-reboot --collect systemctl reboot")
    row: dict[str, Any] = {"answers_s": round(wait("the reboot", lambda: (
        (b := guest(machine, "cat /proc/sys/kernel/random/boot_id", timeout=10).strip()) != "" and b != boot_id),
        timeout, machine), 1)}
    row["disk_written_bytes"] = machine.disk_bytes_written() - written
    row["healthy_s"] = round(time.monotonic() - start + wait(
        "a healthy boot after the reboot", lambda: on_slot(machine, slot), timeout, machine), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = make_parser("bench.ota", "OTA bytes over the wire and update/rollback times in QEMU")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per wait (TCG on 2 cores is slow)")
    ap.add_argument("--class", dest="cls", default=CLS, help=f"the class (default {CLS}; arm64-vision boots in "
                    "emulated qemu-system-aarch64)")
    args = ap.parse_args(argv)
    cls = args.cls
    repo = f"kiln/{cls}"
    state = make_state_dir(ROOT)
    hc = load_class(cls, ROOT / "images")
    key = resolve_signing_key(hc, None)
    figures: dict[str, Any] = {"class": cls, "architecture": hc.spec.architecture.value,
                               "machine": describe_machine()}
    try:
        with tempfile.TemporaryDirectory(dir=state.tmp_dir) as tmp_name:
            tmp = Path(tmp_name)
            print("building v1 and four releases ...", flush=True)
            records = {V1: build(state, V1, None, cls)}  # first: its optimized model is reused by the OS release
            projects = {V1: None, MODEL: make_retrained_project(tmp / "model", cls=cls),
                        LARGE: make_widened_project(tmp / "large", cls=cls),
                        PACKAGE: make_package_project(tmp / "package", cls=cls),
                        BAD: make_broken_golden_project(tmp / "bad", cls=cls, state=state)}
            records.update({v: build(state, v, p, cls) for v, p in projects.items() if p is not None})
            with running_registry(tmp / "registry", lookaside_dir=tmp / "signatures") as info:
                release(state, info, key, tmp / "signatures", V1, None, cls)
                m1 = manifest(info, repo, V1)
                figures["full_image_bytes"] = image_bytes(m1)
                figures["image_uncompressed_bytes"] = sum(layer["size"] for layer in records[V1]["layers"])
                figures["one_package_updates"] = one_package_updates(records[V1], m1)
                print("making v1's disk ...", flush=True)
                image = tmp / "disk.raw"
                assemble.make_disk(context(state), records[V1]["image"]["ref"], output=image, version=V1)
                port = info.address.rsplit(":", 1)[1]
                assert info.lookaside is not None
                config = json.dumps({"registry": f"{vm.HOST_FROM_GUEST}:{port}", "insecure": True,
                                     "lookaside": f"http://{vm.HOST_FROM_GUEST}:{info.lookaside.rsplit(':', 1)[1]}"})
                cfg = vm.VMConfig(disk=image, workdir=tmp / "vm")
                with vm.start_vm(cfg) as machine:
                    figures["accel"] = machine.accel.value
                    figures["first_boot_healthy_s"] = round(machine.wait_for_healthy(args.timeout), 1)
                    guest(machine, f"systemctl mask --now kiln-agent.timer; mkdir -p /etc/kiln && "
                                   f"echo '{config}' > /etc/kiln/agent.json")
                    print("rebooting once without an update ...", flush=True)
                    figures["reboot"] = plain_reboot(machine, "a", args.timeout)
                    print(f"  {figures['reboot']}", flush=True)
                    previous, prev_record, slot, good = m1, records[V1], "b", "a"
                    for name, version in (("model-only", MODEL), ("model-large", LARGE), ("os-package", PACKAGE),
                                          ("bad-golden", BAD)):
                        release(state, info, key, tmp / "signatures", version, projects[version], cls)
                        mf = manifest(info, repo, version)
                        print(f"updating to {version} ({name}) into slot {slot} ...", flush=True)
                        row = update(machine, info, version, slot, bad=name == "bad-golden", timeout=args.timeout,
                                     good_slot=good)
                        row.update(version=version, floor_bytes=changed_bytes(previous, mf),
                                   changed_groups=changed_groups(prev_record, records[version]),
                                   changed_os_layers=changed_os_layers(prev_record, records[version]))
                        row["vs_full_image"] = row["wire_bytes"] / figures["full_image_bytes"]
                        row["vs_floor"] = row["wire_bytes"] / row["floor_bytes"]
                        row["written_beyond_reboot_bytes"] = row["disk_written_bytes"] \
                            - figures["reboot"]["disk_written_bytes"]
                        figures[name] = row
                        print(f"  {row}", flush=True)
                        if name != "bad-golden":
                            previous, prev_record, slot, good = mf, records[version], good, slot
                    machine.kill()
    except KilnError as exc:
        return failed(exc)
    print_table(figures)
    write_figures(args.json, figures)
    return 0


def print_table(f: dict[str, Any]) -> None:
    rows = [("full image (fresh device)", mb(f["full_image_bytes"]), "compressed layers + config + manifest"),
            ("image, uncompressed", mb(f["image_uncompressed_bytes"]), "the sum of its layers"),
            (f"first boot to healthy ({f['accel']})", f"{f['first_boot_healthy_s']:.1f} s", ""),
            ("a reboot, no update: to healthy", f"{f['reboot']['healthy_s']:.1f} s",
             f"{f['reboot']['answers_s']:.1f} s until the new boot answers: the floor of an update's time"),
            ("a reboot, no update: written to disk", mb(f["reboot"]["disk_written_bytes"]),
             "what any boot writes (journal, state), reboot to the new boot answering")]
    one = f["one_package_updates"]
    if one:
        full = f["full_image_bytes"]
        rows.append(("one-package update of any installed source package", f"{one['median_bytes'] / full:.2%}",
                     f"median of {one['sources']} (p90 {one['p90_bytes'] / full:.2%}, max {one['max_bytes'] / full:.2%}"
                     f": {one['max_source']}); {one['at_most_5_percent']:.0%} at most 5 %; its layer of "
                     f"{one['layers']} OS layers + rest ({mb(one['rest_bytes'])}), from the manifest's sizes"))
    for name in ("model-only", "model-large", "os-package"):
        r = f[name]
        os_layers = f" (OS layers: {', '.join(r['changed_os_layers'])})" if r["changed_os_layers"] else ""
        rows.append((f"{name} update {r['version']}: over the wire", mb(r["wire_bytes"]),
                     f"{r['vs_full_image']:.2%} of the full image; {r['vs_floor']:.3f}x of the changed layers "
                     f"({mb(r['floor_bytes'])}: {', '.join(r['changed_groups'])}){os_layers}"))
        rows.append((f"{name} update: start to blessed", f"{r['blessed_s']:.1f} s",
                     f"{r['install_s']:.1f} s until the new boot answers, then health checks and blessing"))
        rows.append((f"{name} update: written to the device's disk", mb(r["disk_written_bytes"]),
                     f"QEMU's block statistics, update start to the new boot; "
                     f"{r['disk_written_bytes'] / r['floor_bytes']:.0f}x the changed layers"))
        rows.append((f"{name} update: written beyond a plain reboot", mb(r["written_beyond_reboot_bytes"]),
                     f"{r['written_beyond_reboot_bytes'] / r['floor_bytes']:.1f}x the changed layers"))
    r = f["bad-golden"]
    rows.append((f"bad update {r['version']}: over the wire", mb(r["wire_bytes"]), ""))
    rows.append(("bad update: start to back on the good slot", f"{r['back_on_good_slot_s']:.1f} s",
                 f"{r['boots']} boots (trials, then the good slot); "
                 f"rolled back: {', '.join(r['rolled_back']) or 'NONE'}"))
    print_rows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
