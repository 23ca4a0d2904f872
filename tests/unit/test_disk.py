"""Disk layout, boot entries, identifiers and errors (pure: no mkfs, no QEMU)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.core.errors import DiskError, ToolMissing, VMError
from builder.disk import assemble, rawdisk, unpacked, vm
from builder.spec.loader import load_class
from tests.conftest import ROOT, kiln

# Not `-m builder.cli`: that runs cli.py as __main__, a second module the disk and vm commands never see.
GiB, MiB = 1024**3, 1024**2


def make_rootfs(root: Path, *, kernel: bool = True, initrd: bool = True, version: str = "1.2.3",
                disk_spec: dict[str, object] | None = None) -> Path:
    """A fake unpacked Kiln image: release.json, class.json, kargs, a kernel."""
    hc = load_class("qemu-x86_64", ROOT / "images")
    spec = hc.model_dump(mode="json", by_alias=True)
    # Pinned here, so the class's own sizes can change without touching these tests.
    spec["spec"]["disk"].update({"esp": 256 * MiB, "root": 2 * GiB, "data": GiB, "compression": "lz4",
                                 "filesystem": "erofs"})
    spec["spec"]["envelope"]["storage"] = 8 * GiB
    if disk_spec is not None:
        spec["spec"]["disk"].update(disk_spec)
    kiln = root / "usr/lib/kiln"
    kiln.mkdir(parents=True)
    (kiln / "class.json").write_text(json.dumps(spec))
    (kiln / "release.json").write_text(json.dumps({"class": hc.name, "compatible": f"kiln,{hc.name}",
                                                   "version": version}))
    kargs = root / "usr/lib/bootc/kargs.d"
    kargs.mkdir(parents=True)
    (kargs / "10-kiln.toml").write_text('kargs = ["console=ttyS0,115200n8", "panic=10"]\n')
    (kargs / "20-extra.toml").write_text('kargs = ["quiet"]\n')
    mod = root / "usr/lib/modules/6.1.0-99-amd64"
    mod.mkdir(parents=True)
    if kernel:
        (mod / "vmlinuz").write_bytes(b"kernel")
    if initrd:
        (mod / "initramfs.img").write_bytes(b"initrd")
    return root


def info(tmp_path: Path, **kwargs: object) -> unpacked.ImageInfo:
    return unpacked.read_image_info(make_rootfs(tmp_path / "rootfs", **kwargs), "test-image")  # type: ignore[arg-type]


# --- reading the image ----------------------------------------------------------------


def test_image_info_from_a_rootfs(tmp_path: Path) -> None:
    i = info(tmp_path)
    assert (i.class_name, i.version, i.kernel_version) == ("qemu-x86_64", "1.2.3", "6.1.0-99-amd64")
    assert i.kargs == ("console=ttyS0,115200n8", "panic=10", "quiet")  # file-name order
    assert i.disk.root == 2 * GiB and i.disk.compression == "lz4"
    assert i.storage == 8 * GiB and i.development


def test_newest_kernel_wins(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "r")
    for kver in ("6.10.0-1-amd64", "6.9.0-1-amd64"):
        (root / "usr/lib/modules" / kver).mkdir()
        (root / "usr/lib/modules" / kver / "vmlinuz").write_bytes(b"k")
        (root / "usr/lib/modules" / kver / "initramfs.img").write_bytes(b"i")
    assert unpacked.read_image_info(root, "x").kernel_version == "6.10.0-1-amd64"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kernel": False}, "test-image has no kernel: no /usr/lib/modules/<kver>/vmlinuz"),
    ({"initrd": False}, "has a kernel but no initramfs: /usr/lib/modules/6.1.0-99-amd64/initramfs.img is missing"),
], ids=["no-kernel", "no-initramfs"])
def test_image_without_kernel_is_a_disk_error(tmp_path: Path, kwargs: dict[str, bool], message: str) -> None:
    with pytest.raises(DiskError) as exc:
        info(tmp_path, **kwargs)
    assert message in str(exc.value)


def test_not_a_kiln_image(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "r")
    (root / "usr/lib/kiln/release.json").unlink()
    with pytest.raises(DiskError, match=r"x is not a Kiln image: /usr/lib/kiln/release.json is missing"):
        unpacked.read_image_info(root, "x")


# --- layout ----------------------------------------------------------------------------


def test_layout_follows_the_spec(tmp_path: Path) -> None:
    plan = assemble.finalize_disk_plan(info(tmp_path), output=tmp_path / "d.raw")
    labels = [p.label for p in plan.partitions]
    assert labels == ["esp", "root-a", "root-b", "data"]
    esp, a, b, data = plan.partitions
    assert (esp.size, a.size, b.size, data.size) == (256 * MiB, 2 * GiB, 2 * GiB, 1 * GiB)
    assert esp.start == MiB and all(p.start % MiB == 0 for p in plan.partitions)
    assert all(x.end == y.start for x, y in zip(plan.partitions, plan.partitions[1:], strict=False))
    assert plan.size == data.end + MiB
    assert esp.type_guid == assemble.ESP_TYPE and a.type_guid == b.type_guid == assemble.ROOT_TYPES[plan.architecture]
    assert data.type_guid == assemble.LINUX_DATA_TYPE  # not the /var type: gpt-auto must not mount it


def test_size_grows_the_data_partition(tmp_path: Path) -> None:
    plan = assemble.finalize_disk_plan(info(tmp_path), size=8 * GiB)
    assert plan.size == 8 * GiB
    assert plan.partition("data").size == 8 * GiB - 2 * MiB - 256 * MiB - 4 * GiB
    assert plan.partition("root-b").size == 2 * GiB


def test_size_smaller_than_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DiskError) as exc:
        assemble.finalize_disk_plan(info(tmp_path), size=1 * GiB)
    assert str(exc.value) == (
        "disk size 1 GiB is smaller than the image's layout needs: esp 256 MiB + root-a 2 GiB + root-b 2 GiB "
        "+ data 1 GiB + GPT 2 MiB = 5.25 GiB (spec.disk of qemu-x86_64)")
    assert exc.value.hint and "--size 5.25GiB" in exc.value.hint


def test_layout_bigger_than_the_storage_envelope(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"storage envelope of qemu-x86_64 is 8 GiB \(spec.envelope.storage\)"):
        assemble.finalize_disk_plan(info(tmp_path, disk_spec={"root": "4GiB"}))


def test_only_erofs_roots(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="root filesystem squashfs is not supported"):
        assemble.finalize_disk_plan(info(tmp_path, disk_spec={"filesystem": "squashfs"}))


def test_default_output_is_the_release_dir(tmp_path: Path) -> None:
    plan = assemble.finalize_disk_plan(info(tmp_path, version="1.0.0-b.7"), fmt="qcow2")
    assert plan.output.parts[-3:] == ("qemu-x86_64", "1.0.0-b.7", "disk.qcow2")


# --- identifiers -------------------------------------------------------------------------


def test_identifiers_are_derived_from_class_and_version(tmp_path: Path) -> None:
    one = assemble.finalize_disk_plan(info(tmp_path / "1"))
    again = assemble.finalize_disk_plan(info(tmp_path / "2"))
    other = assemble.finalize_disk_plan(info(tmp_path / "3", version="1.2.4"))
    assert one == again
    ids = lambda p: [p.disk_guid, *(x.uuid for x in p.partitions), p.root_fs_uuid, p.data_fs_uuid]  # noqa: E731
    assert len(set(ids(one))) == 7
    assert not set(ids(one)) & set(ids(other))
    assert len(one.esp_volume_id) == 8 and int(one.esp_volume_id, 16) >= 0


# --- boot loader -------------------------------------------------------------------------


def test_boot_entry_for_slot_a(tmp_path: Path) -> None:
    plan = assemble.finalize_disk_plan(info(tmp_path))
    root_a = plan.partition("root-a").uuid
    assert plan.entry_name == "kiln-1.2.3-a.conf"
    assert plan.entry == (
        "title Kiln qemu-x86_64 1.2.3 (slot a)\n"
        "version 1.2.3\n"
        "sort-key kiln\n"
        "linux /kiln/a/vmlinuz\n"
        "initrd /kiln/a/initramfs.img\n"
        f"options root=PARTUUID={root_a} ro rootfstype=erofs kiln.slot=a console=ttyS0,115200n8 panic=10 quiet\n"
    )


def test_loader_conf_never_pins_an_entry() -> None:
    conf = assemble.finalize_loader_conf()
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert "timeout 0" in lines
    assert "default kiln-*" in lines  # a pattern: a used-up trial entry must not keep booting
    assert not any(line.startswith("default") and ".conf" in line for line in lines)


def test_trial_entry_name_has_the_boot_counter() -> None:
    assert assemble.finalize_entry_name("2.0.0", "b", tries=3) == "kiln-2.0.0-b+3.conf"


def test_sfdisk_script(tmp_path: Path) -> None:
    plan = assemble.finalize_disk_plan(info(tmp_path))
    script = assemble.finalize_sfdisk_script(plan)
    assert script.startswith(f"label: gpt\nlabel-id: {plan.disk_guid}\nunit: sectors\nfirst-lba: 2048\n")
    assert f'start=2048, size=524288, type={assemble.ESP_TYPE}, uuid={plan.partition("esp").uuid}, name="esp"' in script
    assert script.count("name=") == 4


def test_mkfs_command_lines_are_reproducible(tmp_path: Path) -> None:
    plan = assemble.finalize_disk_plan(info(tmp_path))
    erofs = [str(a) for a in assemble.finalize_erofs_argv(plan, Path("/r"), Path("/o"))]
    assert erofs == ["mkfs.erofs", "--quiet", "-T0", f"-U{plan.root_fs_uuid}", "-zlz4", "/o", "/r"]
    data = [str(a) for a in assemble.finalize_data_argv(plan, Path("/t"), Path("/o"))]
    assert data[3:5] == ["-L", "data"] and f"hash_seed={plan.data_fs_uuid},root_owner=0:0" in data
    assert data[-1] == "1048576k"


def test_copy_sparse_keeps_holes(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    with src.open("wb") as fh:
        fh.write(b"a" * 100)
        fh.seek(8 * MiB)
        fh.write(b"b" * 100)
    with dest.open("wb") as fh:
        fh.truncate(16 * MiB)
    rawdisk.copy_sparse(src, dest, MiB)
    data = dest.read_bytes()
    assert data[MiB:MiB + 100] == b"a" * 100 and data[9 * MiB:9 * MiB + 100] == b"b" * 100
    assert data.count(0) == len(data) - 200
    assert dest.stat().st_blocks * 512 < 4 * MiB


# --- the VM command line --------------------------------------------------------------


def test_qemu_argv(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(512))
    fw = vm.Firmware(Path("/fw/CODE.fd"), Path("/fw/VARS.fd"))
    vp = vm.finalize_vm_paths(tmp_path / "vm")
    cfg = vm.VMConfig(disk=image, snapshot=True, no_reboot=True)
    argv = vm.finalize_qemu_argv(cfg, fw, vp, vm.Accel.tcg, 2222)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-accel tcg -cpu max -smp 2 -m 1024" in joined
    assert "-global ICH9-LPC.noreboot=off" in joined  # the TCO watchdog can reset the guest
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd" in argv
    assert f"if=pflash,format=raw,unit=1,file={vp.vars}" in argv  # the private copy, never the template
    assert f"if=none,id=disk0,format=raw,file={image},cache=writeback,snapshot=on" in argv
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22" in argv
    assert f"file,id=console,path={vp.console}" in argv and "-no-reboot" in argv


def fake_guest_agent(path: Path, *, close_on_status: bool) -> threading.Thread:
    """A QEMU guest agent on a Unix socket, for one client: sync, guest-exec, then guest-exec-status
    answered with output, or the channel closed there as when the guest shuts down."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def requests(conn: socket.socket) -> Iterator[dict[str, Any]]:
        """The agent reads a JSON stream (the sync request has no newline); 0xff resets it."""
        buf, decoder = "", json.JSONDecoder()
        while chunk := conn.recv(4096):
            buf += chunk.replace(b"\xff", b"").decode()
            while buf.strip():
                try:
                    request, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                buf = buf.lstrip()[end:]
                yield request

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            for request in requests(conn):
                if request["execute"] == "guest-sync-delimited":
                    conn.sendall(b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
                    continue
                if request["execute"] == "guest-exec":
                    reply: dict[str, object] = {"pid": 7}
                elif close_on_status:
                    return
                else:
                    reply = {"exited": True, "exitcode": 0, "out-data": base64.b64encode(b"active\n").decode()}
                conn.sendall(json.dumps({"return": reply}).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("close_on_status", [False, True])
def test_guest_exec_through_the_guest_agent(tmp_path: Path, close_on_status: bool) -> None:
    vp = vm.finalize_vm_paths(tmp_path)
    thread = fake_guest_agent(vp.qga, close_on_status=close_on_status)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        machine = vm.VM(config=vm.VMConfig(disk=tmp_path / "d.raw"), paths=vp, proc=proc, argv=[],
                        accel=vm.Accel.tcg, ssh_port=0)
        if close_on_status:  # a clear VMError (callers retry on it), never a hang or an AttributeError
            with pytest.raises(VMError, match="the channel closed"):
                machine.guest_exec("systemctl is-active x", timeout=10)
        else:
            r = machine.guest_exec("systemctl is-active x", timeout=10)
            assert (r.exit_status, r.stdout) == (0, "active\n")
    finally:
        proc.kill()
        proc.wait()
    thread.join(10)
    assert not thread.is_alive()


def test_qcow2_is_detected(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(100))
    assert vm.finalize_disk_format(image) == "qcow2"


def test_missing_ovmf(tmp_path: Path) -> None:
    with pytest.raises(ToolMissing, match=r"OVMF code firmware /nonexistent/CODE.fd not found") as exc:
        vm.find_firmware(Path("/nonexistent/CODE.fd"), Path("/nonexistent/VARS.fd"))
    assert exc.value.hint and "apt-get install ovmf" in exc.value.hint
    with pytest.raises(VMError, match="pass both --ovmf-code and --ovmf-vars"):
        vm.find_firmware(Path("/nonexistent/CODE.fd"), None)


# --- the CLI: clear errors, exit codes, no tracebacks ---------------------------------


def test_cli_disk_image_without_kernel(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "rootfs", kernel=False)
    r = kiln("disk", str(root), "-o", str(tmp_path / "d.raw"))
    assert r.returncode == 9, r.stderr
    assert "has no kernel: no /usr/lib/modules/<kver>/vmlinuz" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "d.raw").exists()


def test_cli_disk_size_too_small(tmp_path: Path) -> None:
    r = kiln("disk", str(make_rootfs(tmp_path / "rootfs")), "--size", "1GiB", "-o", str(tmp_path / "d.raw"))
    assert r.returncode == 9, r.stderr
    assert "disk size 1 GiB is smaller than the image's layout needs" in r.stderr
    assert not (tmp_path / "d.raw").exists()


def test_cli_disk_bad_size() -> None:
    r = kiln("disk", "whatever", "--size", "lots")
    assert r.returncode == 2 and "--size:" in r.stderr


def test_cli_vm_missing_ovmf(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(512))
    r = kiln("vm", "run", str(image), "--ovmf-code", "/nonexistent/CODE.fd", "--ovmf-vars", "/nonexistent/VARS.fd")
    assert r.returncode == 3, r.stderr
    assert "OVMF code firmware /nonexistent/CODE.fd not found" in r.stderr and "Traceback" not in r.stderr


def test_cli_vm_missing_disk(tmp_path: Path) -> None:
    r = kiln("vm", "run", str(tmp_path / "nope.raw"))
    assert r.returncode == 10 and "nope.raw not found" in r.stderr


# --- paths from outside never leave build/ (finding: `--version ../../x` wrote outside it) ---------------


def test_cli_disk_version_cannot_escape_the_build_dir(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "rootfs")
    r = kiln("disk", str(root), "--version", "../../../escaped")
    assert r.returncode == 2, r.stderr
    assert "--version: '../../../escaped' is not a Kiln version" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(ROOT.parent.glob("escaped*")) and not (ROOT / "escaped").exists()


@pytest.mark.parametrize(("field", "value"), [("class", "../.."), ("class", "a/b"), ("version", "../../x")])
def test_release_json_cannot_name_paths_outside_build(tmp_path: Path, field: str, value: str) -> None:
    root = make_rootfs(tmp_path / "rootfs")
    release = root / "usr/lib/kiln/release.json"
    release.write_text(json.dumps({**json.loads(release.read_text()), field: value}))
    with pytest.raises(DiskError, match=f"release.json: {field}: '.*' is not a (valid|Kiln)"):
        unpacked.read_image_info(root, "test-image")
