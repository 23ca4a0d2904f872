"""OCI image -> bootable A/B GPT disk, assembled without mounting anything.

Layout (sizes from the class spec, `spec.disk`):

    esp     FAT32: systemd-boot, loader.conf, /kiln/<slot>/{vmlinuz,initramfs.img} (slot B's the
            same as slot A's where the ESP has room), one Boot Loader Specification entry for slot A;
            with verified boot (the image's boot layer), the signed systemd-boot and slot A's signed
            UKI as EFI/Linux/kiln-<version>-a.efi instead
    root-a  the image's root filesystem, read-only (erofs); with verified boot, its layer list
            (/kiln-layers) alone, the layers in the data partition's layer store
    root-b  empty, sized like root-a (the first update writes it)
    data    ext4: /etc and /var overlays (overlay/<dir>/{upper,work}), agent state

`finalize_*` functions compute the plan (pure; unit-tested); `make_*` functions
write files. Every identifier (disk GUID, partition UUIDs, filesystem UUIDs, the
FAT volume id) is derived from class + version with uuid5, and every timestamp is
fixed, so the same image and version give the same disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder.core import paths, safe
from builder.core.context import Context
from builder.core.errors import CommandFailed, DiskError, UsageError
from builder.core.files import write_json_atomic
from builder.core.progress import Steps
from builder.core.run import find_tool, run
from builder.core.safe import format_size
from builder.core.state import StateDir
from builder.disk import verified
from builder.disk.layer_store import OCI_SEED_DIR, make_layer_store
from builder.disk.provision import EtcFile, place_etc_files
from builder.disk.rawdisk import SECTOR, MiB, copy_sparse
from builder.disk.unpacked import ImageInfo, read_image_info
from builder.spec.schema import Architecture, RootFilesystem
from kiln_device import contract

ALIGN = MiB  # partitions start on 1 MiB boundaries
GPT_HEAD = MiB  # protective MBR + primary GPT, padded to the first aligned start
GPT_TAIL = MiB  # backup GPT (33 sectors), padded
EPOCH = 0  # every timestamp on the disk (files, filesystems)
FORMATS = ("raw", "qcow2")

# A fixed namespace: uuid5(KILN_NS, "<class>/<version>/<what>") names every identifier.
KILN_NS = uuid.UUID("6b696c6e-2d64-6973-6b2d-6e616d657370")

# GPT partition types (Discoverable Partitions Specification).
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPES = {
    Architecture.x86_64: "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    Architecture.aarch64: "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
}
# Generic Linux data, not the /var type: the initramfs sets up the overlays itself,
# and systemd-gpt-auto-generator (masked in images anyway) must not mount it on /var.
LINUX_DATA_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

SLOTS = contract.SLOTS
ROOT_A = contract.slot_label("a")  # the slot `kiln disk` writes; root-b stays empty until the first update
SYSTEMD_BOOT_DIR = "usr/lib/systemd/boot/efi"
HOST_SYSTEMD_BOOT_DIR = Path("/usr/lib/systemd/boot/efi")
# What the data partition starts with: the overlay directories the initramfs mounts.
DATA_DIRS = ("overlay/etc/upper", "overlay/etc/work", "overlay/var/upper", "overlay/var/work")
EROFS_COMPRESSORS = contract.EROFS_COMPRESSORS


# --- the plan ----------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    label: str
    type_guid: str
    uuid: str
    start: int  # bytes, aligned
    size: int  # bytes, aligned

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class DiskPlan:
    """Everything `make_disk` writes, derived once from the image and the options."""

    class_name: str
    version: str
    architecture: Architecture
    output: Path
    fmt: str
    size: int
    disk_guid: str
    partitions: tuple[Partition, ...]
    filesystem: RootFilesystem
    compression: str
    root_fs_uuid: str
    data_fs_uuid: str
    esp_volume_id: str
    kernel_version: str
    kargs: tuple[str, ...]
    loader_conf: str
    entry_name: str
    entry: str
    verified: bool = False  # the image's signed UKIs boot it (ImageInfo.boot)

    def partition(self, label: str) -> Partition:
        for p in self.partitions:
            if p.label == label:
                return p
        raise KeyError(label)


def finalize_uuid(class_name: str, version: str, what: str) -> str:
    return str(uuid.uuid5(KILN_NS, f"{class_name}/{version}/{what}"))


def align_up(value: int, to: int = ALIGN) -> int:
    return -(-value // to) * to


def finalize_layout(info: ImageInfo, size: int | None = None) -> tuple[Partition, ...]:
    """esp | root-a | root-b | data, 1 MiB aligned; with `size`, data takes what is left."""
    d = info.disk
    esp, root = align_up(d.esp), align_up(d.root)
    data = align_up(d.data)
    minimum = GPT_HEAD + esp + 2 * root + data + GPT_TAIL
    parts_text = (f"esp {format_size(esp)} + root-a {format_size(root)} + root-b {format_size(root)} "
                  f"+ data {format_size(data)} + GPT {format_size(GPT_HEAD + GPT_TAIL)}")
    if size is not None:
        if size < minimum:
            raise DiskError(f"disk size {format_size(size)} is smaller than the image's layout needs: "
                            f"{parts_text} = {format_size(minimum)} (spec.disk of {info.class_name})",
                            hint=f"use --size {format_size(minimum).replace(' ', '')} or more, "
                                 "or shrink spec.disk")
        data = (size - GPT_TAIL - (GPT_HEAD + esp + 2 * root)) // ALIGN * ALIGN
    total = GPT_HEAD + esp + 2 * root + data + GPT_TAIL
    if info.storage is not None and total > info.storage:
        raise DiskError(f"the disk needs {format_size(total)} ({parts_text}) but the storage envelope "
                        f"of {info.class_name} is {format_size(info.storage)} (spec.envelope.storage)")
    root_type = ROOT_TYPES[info.architecture]
    sizes = ((contract.ESP_LABEL, ESP_TYPE, esp), (ROOT_A, root_type, root),
             (contract.slot_label("b"), root_type, root), (contract.DATA_LABEL, LINUX_DATA_TYPE, data))
    parts: list[Partition] = []
    start = GPT_HEAD
    for label, type_guid, psize in sizes:
        parts.append(Partition(label, type_guid, finalize_uuid(info.class_name, info.version, f"part/{label}"),
                               start, psize))
        start += psize
    return tuple(parts)


def finalize_loader_conf() -> str:
    """`timeout 0` and a pattern default: never pin one entry (a pinned trial entry boots
    even after its tries are used up, so the device reboot-loops with no rollback)."""
    return "# Written by kiln disk. Never pin `default` to one entry (see docs/disk-and-vm.md).\n" \
           f"timeout 0\ndefault {contract.ENTRY_PATTERN}\nconsole-mode keep\neditor no\n"


def finalize_entry_name(version: str, slot: str, tries: int | None = None) -> str:
    """`kiln-<version>-<slot>.conf`; with tries, systemd's boot counter `+N` (a trial entry)."""
    return contract.entry_name(version, slot, tries)


def finalize_entry(*, class_name: str, version: str, slot: str, root_partuuid: str,
                   kargs: tuple[str, ...], filesystem: RootFilesystem = RootFilesystem.erofs) -> str:
    """A Boot Loader Specification type #1 entry for one slot (the agent writes the other slot's alike)."""
    return contract.render_entry(cls=class_name, version=version, slot=slot, partuuid=root_partuuid, kargs=kargs,
                                 rootfstype=filesystem.value)


def finalize_output(info: ImageInfo, output: Path | None, fmt: str) -> Path:
    if output is not None:
        return output
    return paths.disk_path(info.class_name, info.version, fmt)


def finalize_disk_plan(info: ImageInfo, *, output: Path | None = None, fmt: str = "raw",
                       size: int | None = None) -> DiskPlan:
    """Derive the whole disk from the image: layout, identifiers, loader files. Pure."""
    if fmt not in FORMATS:
        raise DiskError(f"unknown disk format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if info.disk.filesystem is not RootFilesystem.erofs:
        raise DiskError(f"root filesystem {info.disk.filesystem.value} is not supported by kiln disk yet "
                        f"(spec.disk.filesystem of {info.class_name}); use erofs")
    parts = finalize_layout(info, size)
    root_a = next(p for p in parts if p.label == ROOT_A)
    cls, ver = info.class_name, info.version
    return DiskPlan(
        class_name=cls, version=ver, architecture=info.architecture,
        output=finalize_output(info, output, fmt), fmt=fmt,
        size=parts[-1].end + GPT_TAIL,
        disk_guid=finalize_uuid(cls, ver, "disk"),
        partitions=parts,
        filesystem=info.disk.filesystem,
        compression=info.disk.compression,
        root_fs_uuid=finalize_uuid(cls, ver, "fs/root-a"),
        data_fs_uuid=finalize_uuid(cls, ver, "fs/data"),
        esp_volume_id=finalize_uuid(cls, ver, "fs/esp").replace("-", "")[:8],
        kernel_version=info.kernel_version,
        kargs=info.kargs,
        loader_conf=finalize_loader_conf(),
        entry_name=contract.entry_name(ver, "a", uki=info.boot is not None),
        entry=finalize_entry(class_name=cls, version=ver, slot="a", root_partuuid=root_a.uuid,
                             kargs=info.kargs, filesystem=info.disk.filesystem),
        verified=info.boot is not None,
    )


def finalize_sfdisk_script(plan: DiskPlan) -> str:
    lines = ["label: gpt", f"label-id: {plan.disk_guid}", "unit: sectors", f"first-lba: {GPT_HEAD // SECTOR}",
             f"last-lba: {(plan.size - GPT_TAIL) // SECTOR - 1}", ""]
    for p in plan.partitions:
        lines.append(f"start={p.start // SECTOR}, size={p.size // SECTOR}, type={p.type_guid}, "
                     f'uuid={p.uuid}, name="{p.label}"')
    return "\n".join(lines) + "\n"


def finalize_erofs_argv(plan: DiskPlan, rootfs: Path, out: Path) -> list[str | os.PathLike[str]]:
    argv: list[str | os.PathLike[str]] = ["mkfs.erofs", "--quiet", f"-T{EPOCH}", f"-U{plan.root_fs_uuid}"]
    compressor = EROFS_COMPRESSORS[plan.compression]
    if compressor:
        argv.append(f"-z{compressor}")
    return [*argv, out, rootfs]


def finalize_data_argv(plan: DiskPlan, tree: Path, out: Path) -> list[str | os.PathLike[str]]:
    data = plan.partition(contract.DATA_LABEL)
    return [
        "mkfs.ext4", "-q", "-F",
        "-L", contract.DATA_LABEL,
        "-U", plan.data_fs_uuid,
        "-E", f"hash_seed={plan.data_fs_uuid},root_owner=0:0",
        "-b", "4096",
        # fs-verity on the layer store (kiln_device.layers): the agent and initramfs turn it on per layer
        "-O", "verity",
        "-d", tree,
        out, str(data.size // 1024) + "k",
    ]  # fmt: skip


# --- doing it ----------------------------------------------------------------


@dataclass
class DiskRecord:
    """What `kiln disk` made (`--json` prints it; bench.boot reads it)."""

    class_name: str
    version: str
    source: str
    output: str
    format: str
    size: int
    file_size: int  # bytes allocated on the host (raw is sparse)
    root_image_size: int
    development: bool
    partitions: list[dict[str, Any]]
    architecture: str = "x86_64"  # what `kiln vm run` boots it as (builder.disk.vm.finalize_disk_architecture)
    # Verified boot: the layer list digest slot A's UKI binds, and the firmware variables with Kiln's PK,
    # KEK and db enrolled that `kiln vm run` boots it with (Secure Boot enforcing); else None.
    layers_digest: str | None = None
    efivars: str | None = None
    uki_size: int | None = None  # bytes of slot A's UKI (each update writes one like it to the ESP)
    durations: dict[str, float] = field(default_factory=dict)
    etc: list[dict[str, Any]] = field(default_factory=list)  # files placed in /etc at flash time (digests)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_disk(ctx: Context, source: str, *, output: Path | None = None, fmt: str = "raw",
              size: int | None = None, version: str | None = None,
              etc: Sequence[EtcFile] = ()) -> DiskRecord:
    """Unpack `source` (an image ref in Kiln's store, or a rootfs directory) and write its disk.

    `version` overrides the image's release.json version (it names the disk's identifiers).
    `etc`: this device's own files for its /etc (builder.disk.provision), in the data partition.
    """
    state, steps = ctx.state, ctx.steps
    mark = steps.mark()
    if version is not None:
        try:
            safe.version(version)
        except ValueError as exc:
            raise UsageError(f"--version: {exc}") from None
    if fmt not in FORMATS:
        raise DiskError(f"unknown disk format {fmt!r}; expected one of {', '.join(FORMATS)}")
    with contextlib.ExitStack() as stack:
        with steps.step(f"unpack {source}"):
            rootfs = stack.enter_context(open_rootfs(source, state.engine_env()))
            info = read_image_info(rootfs, source, version=version)
            plan = finalize_disk_plan(info, output=output, fmt=fmt, size=size)
            check_tools(fmt)
        seed = None if Path(source).is_dir() else (source, state)
        record = make_disk_from_rootfs(plan, info, rootfs, steps, seed=seed, etc=etc)
    record.durations = steps.summary(since=mark)
    write_disk_record(plan.output, record)
    return record


def resolve_source(source: str, version: str | None) -> tuple[str, str | None]:
    """CLASS (its newest build, or --version's), an image ref, or a rootfs directory -> (source, version)."""
    from builder.spec import loader
    from builder.spec.names import image_ref

    if Path(source).is_dir():
        return source, version
    if source in loader.known_classes():
        if version is None:
            records = paths.find_record_paths(source)
            if not records:
                raise DiskError(f"{source} has not been built here (no build/{source}/*/build.json)",
                                hint=f"run `kiln build {source} --version V` first")
            record = json.loads(records[-1].read_text())
            return str(record["image"]["ref"]), str(record["version"])
        return image_ref(source, version), version
    return source, version


def check_tools(fmt: str = "raw") -> None:
    tools = ["mkfs.erofs", "mkfs.ext4", "debugfs", "mkfs.vfat", "mcopy", "sfdisk"]
    for tool in [*tools, "qemu-img"] if fmt == "qcow2" else tools:
        find_tool(tool)


def write_disk_record(disk: Path, record: DiskRecord) -> Path:
    """`<disk>.json` next to the disk: what `kiln vm run` reads (class -> SSH key) and bench reports."""
    path = disk.with_name(disk.name + ".json")
    write_json_atomic(path, record.to_dict())
    return path


@contextlib.contextmanager
def open_rootfs(source: str, engine_env: dict[str, str]) -> Iterator[Path]:
    """A rootfs directory as is, or an image in Kiln's store mounted read-only (`podman image mount`)."""
    path = Path(source)
    if path.is_dir():
        yield path
        return
    probe = run(["podman", "image", "exists", source], env=engine_env, check=False, capture=True, quiet=True)
    if probe.returncode != 0:
        raise DiskError(f"image {source} is not in Kiln's container store",
                        hint="build it with `kiln build CLASS --version V`, or give a rootfs directory")
    try:
        out = run(["podman", "image", "mount", source], env=engine_env, capture=True)
    except CommandFailed as exc:
        raise DiskError(f"unpacking {source}: {exc}") from exc
    try:
        yield Path(out.stdout.decode().strip())
    finally:
        run(["podman", "image", "unmount", source], env=engine_env, check=False, capture=True)


def make_disk_from_rootfs(plan: DiskPlan, info: ImageInfo, rootfs: Path, steps: Steps,
                          seed: tuple[str, StateDir] | None = None, etc: Sequence[EtcFile] = ()) -> DiskRecord:
    """Build each partition's filesystem in a scratch dir, check they fit, then write the disk.

    `seed` (image ref, state dir): also put the image itself, as an OCI layout, where the
    device agent keeps it (see `make_oci_seed`), so the first update moves only new layers.
    """
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    if info.boot is not None and seed is None:
        raise DiskError(f"{info.source} has verified boot: its disk is made from the image in Kiln's store "
                        "(its layers), not from a rootfs directory", hint="give the image ref or the class")
    efivars: Path | None = None
    with tempfile.TemporaryDirectory(dir=plan.output.parent, prefix=".kiln-disk-") as tmp_name:
        tmp = Path(tmp_name)
        images = {label: tmp / f"{label}.img" for label in (ROOT_A, contract.ESP_LABEL, contract.DATA_LABEL)}
        if info.boot is None:
            with steps.step(f"{ROOT_A}: mkfs.erofs ({plan.compression})"):
                make_root_image(plan, rootfs, images[ROOT_A])
        with steps.step("esp: systemd-boot, slot A kernel and boot entry" if info.boot is None else
                        "esp: signed systemd-boot and slot A's signed UKI"):
            make_esp_image(plan, info, rootfs, images[contract.ESP_LABEL], tmp / "esp")
        if seed is not None:
            with steps.step("data: the image as the agent's OCI layout (delta updates)"):
                make_oci_seed(seed[0], seed[1], plan.version, tmp / "data")
            with steps.step("data: the image's layers as the agent's layer store (updates write only new layers)"):
                layers = make_layer_store(plan.version, tmp / "data", boot_layer=info.boot is not None)
            if info.boot is not None:
                with steps.step(f"{ROOT_A}: the layer list its UKI binds ({info.boot.layers[:19]})"):
                    verified.make_layer_list_root(info.boot.layers, layers, images[ROOT_A], tmp / "root-list",
                                                  fs_uuid=plan.root_fs_uuid)
                with steps.step("firmware variables with Kiln's PK, KEK and db enrolled"):
                    efivars = verified.make_disk_efivars(plan.architecture, info.boot, tmp / "efivars.fd")
        if etc:
            with steps.step(f"data: {len(etc)} file(s) for this device's /etc"):
                place_etc_files(etc, tmp / "data")
        with steps.step("data: ext4 with the /etc and /var overlay dirs"):
            make_data_image(plan, images[contract.DATA_LABEL], tmp / "data")
        with steps.step(f"assemble the GPT disk ({format_size(plan.size)})"):
            raw = tmp / "disk.raw"
            make_gpt_disk(plan, images, raw)
            final = raw
            if plan.fmt == "qcow2":
                final = tmp / "disk.qcow2"
                run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, final], capture=True)
            final.replace(plan.output)
            if efivars is not None:
                efivars.replace(verified.efivars_path(plan.output))
        root_size = images[ROOT_A].stat().st_size
    return DiskRecord(
        class_name=plan.class_name, version=plan.version, source=info.source, output=str(plan.output),
        format=plan.fmt, size=plan.size, file_size=plan.output.stat().st_blocks * 512,
        root_image_size=root_size, development=info.development, architecture=plan.architecture.value,
        partitions=[{**asdict(p), "end": p.end} for p in plan.partitions],
        etc=[f.record() for f in etc],
        layers_digest=info.boot.layers if info.boot is not None else None,
        efivars=str(verified.efivars_path(plan.output)) if efivars is not None else None,
        uki_size=info.boot.uki_size() if info.boot is not None else None,
    )


def make_root_image(plan: DiskPlan, rootfs: Path, out: Path) -> None:
    check_compressor(plan.compression)
    try:
        run(finalize_erofs_argv(plan, rootfs, out))
    except CommandFailed as exc:
        raise DiskError(f"writing {ROOT_A}: {exc}") from exc
    root = plan.partition(ROOT_A)
    got = out.stat().st_size
    if got > root.size:
        raise DiskError(f"the image does not fit: its root filesystem is {format_size(got)} but root-a is "
                        f"{format_size(root.size)} (spec.disk.root of {plan.class_name}); nothing was written",
                        hint="raise spec.disk.root, choose stronger compression (lz4hc) or slim the image")


def check_compressor(compression: str) -> None:
    """erofs-utils 1.5 (Debian 12) has lz4 and lz4hc; zstd needs a newer mkfs.erofs."""
    compressor = EROFS_COMPRESSORS.get(compression)
    if not compressor:
        return
    name = compressor.split(",")[0]
    helptext = run(["mkfs.erofs", "--help"], capture=True, check=False, quiet=True)
    available = (helptext.stdout + helptext.stderr).decode(errors="replace")
    m = re.search(r"Available compressors are: (.*)", available)
    if m and name not in m.group(1).replace(",", " ").split():
        raise DiskError(f"mkfs.erofs on this machine cannot compress with {name} (it has {m.group(1).strip()}); "
                        "spec.disk.compression asks for it",
                        hint="choose lz4 or lz4hc, or install erofs-utils >= 1.6 for zstd")


def make_esp_image(plan: DiskPlan, info: ImageInfo, rootfs: Path, out: Path, tree: Path) -> None:
    """FAT32 from a staged tree: mkfs.vfat -C, then mtools copies it in (no mount)."""
    if info.boot is not None:
        verified.stage_verified_esp(info.boot, tree, arch=plan.architecture, entry_name=plan.entry_name,
                                    loader_conf=plan.loader_conf, esp_size=plan.partition(contract.ESP_LABEL).size,
                                    class_name=plan.class_name)
        write_esp(plan, tree, out)
        return
    loader = find_systemd_boot(rootfs, plan.architecture)
    efi = plan.architecture.efi_boot_file
    stage = {
        f"EFI/BOOT/{efi}": loader,
        f"EFI/systemd/{loader.name}": loader,
        "kiln/a/vmlinuz": info.kernel,
        "kiln/a/initramfs.img": info.initrd,
    }
    for rel, src in stage.items():
        dest = tree / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    (tree / "kiln/b").mkdir(parents=True)
    (tree / "loader/entries").mkdir(parents=True)
    (tree / "loader/loader.conf").write_text(plan.loader_conf)
    (tree / "loader/entries" / plan.entry_name).write_text(plan.entry)
    esp = plan.partition(contract.ESP_LABEL)
    payload = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    boot_pair = info.kernel.stat().st_size + info.initrd.stat().st_size
    # Slot B needs room for its own kernel and initramfs when an update lands.
    needed = payload + boot_pair
    if needed > esp.size * 0.9:
        raise DiskError(f"the ESP is too small: two slots of kernel + initramfs need {format_size(needed)} "
                        f"but spec.disk.esp of {plan.class_name} is {format_size(esp.size)}",
                        hint="raise spec.disk.esp")
    if needed + boot_pair <= esp.size * 0.9:
        # Slot B's directory starts with slot A's kernel and initramfs, where the ESP holds a third
        # pair (an update writes a new one beside the old before the rename): the first update that
        # keeps the kernel then writes none (the agent keeps a copy with the same sha256). No entry
        # names slot B, so nothing boots them.
        for name, src in (("vmlinuz", info.kernel), ("initramfs.img", info.initrd)):
            shutil.copyfile(src, tree / "kiln/b" / name)
    write_esp(plan, tree, out)


def write_esp(plan: DiskPlan, tree: Path, out: Path) -> None:
    esp = plan.partition(contract.ESP_LABEL)
    _fix_mtimes(tree)
    env = {"SOURCE_DATE_EPOCH": str(EPOCH), "MTOOLS_SKIP_CHECK": "1"}
    try:
        run(["mkfs.vfat", "-C", "-F", "32", "-n", "ESP", "-i", plan.esp_volume_id, "--invariant",
             out, str(esp.size // 1024)], capture=True)
        run(["mcopy", "-i", out, "-s", "-p", "-m", "-Q", *sorted(tree.iterdir()), "::/"], env=env, capture=True)
    except CommandFailed as exc:
        raise DiskError(f"writing the ESP: {exc}") from exc


def find_systemd_boot(rootfs: Path, arch: Architecture) -> Path:
    """systemd-boot from the image (matches its bootctl), else the host's systemd-boot-efi."""
    name = f"systemd-boot{arch.efi_boot_file.removeprefix('BOOT').lower()}"  # systemd-bootx64.efi
    for candidate in (rootfs / SYSTEMD_BOOT_DIR / name, HOST_SYSTEMD_BOOT_DIR / name):
        if candidate.is_file():
            return candidate
    raise DiskError(f"systemd-boot not found: neither the image nor this machine has {SYSTEMD_BOOT_DIR}/{name}",
                    hint="install it with: apt-get install systemd-boot-efi (or add systemd-boot to the image)")




def make_oci_seed(ref: str, state: StateDir, version: str, tree: Path) -> None:
    """`podman push` the image into an OCI layout under the data tree.

    podman compresses the layers exactly as it does for a registry push (same manifest
    digest, checked in tests/vm), so the agent's `skopeo copy` of the next release
    finds every unchanged blob already there and fetches only the new ones.
    """
    layout = tree / OCI_SEED_DIR
    layout.parent.mkdir(parents=True, exist_ok=True)
    name = contract.oci_ref_name(version)
    try:
        run(["podman", "push", "--quiet", ref, f"oci:{layout}:{name}"], env=state.engine_env(), capture=True)
    except CommandFailed as exc:
        raise DiskError(f"seeding the agent's OCI layout with {ref}: {exc}") from exc


def make_data_image(plan: DiskPlan, out: Path, tree: Path) -> None:
    for rel in DATA_DIRS:
        (tree / rel).mkdir(parents=True, exist_ok=True)
    _fix_mtimes(tree)
    env = {"E2FSPROGS_FAKE_TIME": str(EPOCH or 1)}
    try:
        run(finalize_data_argv(plan, tree, out), env=env, capture=True)  # it says "Creating regular file" on stdout
        # `mkfs.ext4 -d` copies each directory's ctime, which utime cannot fix: set it in the image.
        run(["debugfs", "-w", "-f", "-", out], env=env, input=finalize_ctime_script(tree).encode(), capture=True)
    except CommandFailed as exc:
        raise DiskError(f"writing the data partition: {exc}") from exc


def finalize_ctime_script(tree: Path | None = None) -> str:
    """debugfs commands setting every inode's ctime (mkfs.ext4 -d copies the host's) to EPOCH."""
    dirs = {"/", "/lost+found"}
    for rel in DATA_DIRS:
        parts = rel.split("/")
        dirs.update("/" + "/".join(parts[: i + 1]) for i in range(len(parts)))
    if tree is not None:
        dirs.update("/" + str(p.relative_to(tree)) for p in tree.rglob("*"))
    return "".join(f"set_inode_field {d} ctime {EPOCH}\n" for d in sorted(dirs))


def make_gpt_disk(plan: DiskPlan, images: dict[str, Path], out: Path) -> None:
    """A sparse file, the GPT from sfdisk, each filesystem image copied to its partition."""
    with out.open("wb") as fh:
        fh.truncate(plan.size)
    try:
        run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", out],
            input=finalize_sfdisk_script(plan).encode(), capture=True)
    except CommandFailed as exc:
        raise DiskError(f"writing the partition table: {exc}") from exc
    for label, image in images.items():
        part = plan.partition(label)
        if image.stat().st_size > part.size:
            raise DiskError(f"{label}: {format_size(image.stat().st_size)} does not fit in {format_size(part.size)}")
        copy_sparse(image, out, part.start)


def _fix_mtimes(tree: Path) -> None:
    for p in [tree, *tree.rglob("*")]:
        os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)
