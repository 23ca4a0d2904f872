"""Each image lint on a fake rootfs: a good tree passes, each defect is caught by name."""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.core.errors import GateFailed
from builder.image.lint import lint_rootfs
from kiln_device import lint as lint_mod

ROOT = Path(__file__).resolve().parents[2]
KVER = "6.1.0-28-amd64"


def make_rootfs(root: Path, *, accelerator: str = "none", development: bool = False) -> Path:
    kdir = root / "usr/lib/modules" / KVER
    kdir.mkdir(parents=True)
    (kdir / "vmlinuz").write_bytes(b"kernel")
    (kdir / "initramfs.img").write_bytes(b"initramfs")
    for d in ("boot", "run", "tmp", "var/lib", "etc/ssh", "usr/lib/bootc/kargs.d", "usr/lib/tmpfiles.d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/run").symlink_to("/run")
    (root / "etc/machine-id").write_text("")
    (root / "usr/lib/bootc/kargs.d/10-kiln.toml").write_text('kargs = ["console=ttyS0,115200n8"]\n')
    model = root / "usr/share/kiln/models/digits/1.0.0/model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"onnx-bytes")
    release = {"class": "fake", "compatible": "kiln,fake", "version": "1.0.0", "accelerator": accelerator,
               "driverVersion": "535.309.01-0+deb12u1" if accelerator == "nvidia-dgpu" else None,
               "development": development,
               "models": [{"name": "digits", "version": "1.0.0",
                           "path": "/usr/share/kiln/models/digits/1.0.0/model.onnx",
                           "sha256": hashlib.sha256(b"onnx-bytes").hexdigest()}]}
    (root / "usr/lib/kiln").mkdir(parents=True)
    (root / "usr/lib/kiln/release.json").write_text(json.dumps(release))
    return root


def make_ko(modinfo: dict[str, str]) -> bytes:
    """A minimal little-endian ELF64 object with a .modinfo section (what a kernel module carries)."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info_at, strtab_at = 64, 64 + len(info)
    shoff = strtab_at + len(shstrtab)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sections = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, info_at, len(info), 0, 0, 1, 0)  # .modinfo, PROGBITS
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, strtab_at, len(shstrtab), 0, 0, 1, 0)  # .shstrtab
    return header + info + shstrtab + sections


NVIDIA = "535.309.01"
MODULES = ("nvidia-current", "nvidia-current-uvm", "nvidia-current-modeset", "nvidia-current-drm")


def add_nvidia(root: Path, kmod_version: str = NVIDIA, lib_version: str = NVIDIA, *, kver: str = KVER,
               cuda: str | None = "12.9.79") -> None:
    """Debian's layout: modules in updates/dkms, libraries under nvidia/current reached through
    /etc/alternatives (absolute links), the CUDA runtime wheel's dist-info in the venv."""
    dkms = root / "usr/lib/modules" / KVER / "updates/dkms"
    dkms.mkdir(parents=True)
    for name in MODULES:
        (dkms / f"{name}.ko").write_bytes(make_ko({"version": kmod_version, "license": "NVIDIA",
                                                   "name": name.replace("-", "_"),
                                                   "vermagic": f"{kver} SMP preempt mod_unload modversions "}))
    libdir = root / "usr/lib/x86_64-linux-gnu"
    (libdir / "nvidia/current").mkdir(parents=True)
    (root / "etc/alternatives").mkdir(parents=True, exist_ok=True)
    for lib in ("libcuda", "libnvidia-ml"):
        (libdir / f"nvidia/current/{lib}.so.{lib_version}").write_bytes(b"lib")
        real = f"/usr/lib/x86_64-linux-gnu/nvidia/current/{lib}.so.{lib_version}"
        (root / f"etc/alternatives/{lib}.so.1").symlink_to(real)
        (libdir / f"{lib}.so.1").symlink_to(f"/etc/alternatives/{lib}.so.1")
    if cuda:
        site = root / "usr/lib/kiln/venv/lib/python3.11/site-packages"
        meta = site / f"nvidia_cuda_runtime_cu12-{cuda}.dist-info/METADATA"
        meta.parent.mkdir(parents=True)
        meta.write_text(f"Metadata-Version: 2.1\nName: nvidia-cuda-runtime-cu12\nVersion: {cuda}\n")


def names(root: Path) -> set[str]:
    return {f.lint for f in lint_mod.run_lints(root)}


def test_good_rootfs_passes(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    assert names(root) == set()
    lint_rootfs(root)


def test_good_gpu_rootfs_passes(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, accelerator="nvidia-dgpu")
    add_nvidia(root)
    assert names(root) == set()


Defect = Callable[[Path], None]
DEFECTS: list[tuple[str, str, Defect]] = [
    ("kernel", "found 2", lambda r: (r / "usr/lib/modules/6.2.0").mkdir()),
    ("kernel", "initramfs.img is missing", lambda r: (r / "usr/lib/modules" / KVER / "initramfs.img").unlink()),
    ("boot-empty", "/boot is not empty: boot/vmlinuz", lambda r: (r / "boot/vmlinuz").write_text("k")),
    ("run-empty", "/run is not empty: lock.pid", lambda r: (r / "run/lock.pid").write_text("1")),
    ("tmp-empty", "/tmp is not empty: junk", lambda r: (r / "tmp/junk").write_text("x")),
    ("var-run", "/var/run is not a symlink", lambda r: ((r / "var/run").unlink(), (r / "var/run").mkdir())),
    ("var-tmpfiles", "not in tmpfiles.d: /var/lib/myapp", lambda r: (r / "var/lib/myapp").mkdir()),
    ("release", "release.json is missing", lambda r: (r / "usr/lib/kiln/release.json").unlink()),
    ("kargs", "'kargs' must be a list of strings",
     lambda r: (r / "usr/lib/bootc/kargs.d/10-kiln.toml").write_text('kargs = "quiet"\n')),
    ("kargs", "10-kiln.toml", lambda r: (r / "usr/lib/bootc/kargs.d/10-kiln.toml").write_text("kargs = [\n")),
    ("models", "does not match its sha256",
     lambda r: (r / "usr/share/kiln/models/digits/1.0.0/model.onnx").write_bytes(b"tampered")),
    ("ssh-host-keys", "ssh_host_ed25519_key", lambda r: (r / "etc/ssh/ssh_host_ed25519_key").write_text("k")),
    ("machine-id", "every device would share it", lambda r: (r / "etc/machine-id").write_text("0123abcd\n")),
    ("production-access", "root/.ssh/authorized_keys",
     lambda r: ((r / "root/.ssh").mkdir(parents=True), (r / "root/.ssh/authorized_keys").write_text("k"))),
    # Finding 5: /etc/shadow and the CA bundle (no lint looked at either).
    ("empty-passwords", "empty password for kiosk", lambda r: write_shadow(r, "kiosk::19000:0:99999:7:::")),
    ("production-passwords", "a password hash for root",
     lambda r: write_shadow(r, "root:$6$salt$0123456789abcdef:19000:0:99999:7:::")),
    ("production-passwords", "a password hash for kiosk", lambda r: write_shadow(r, "kiosk:secret:19000::::::")),
    ("ca-bundle", "no CA bundle", lambda r: write_agent_json(r, {"registry": "registry.example.com"})),
    ("ca-bundle", "no CA bundle",
     lambda r: (write_agent_json(r, {"registry": "registry.example.com"}),
                (r / "etc/ssl/certs").mkdir(parents=True), (r / "etc/ssl/certs/ca-certificates.crt").write_text(""))),
]


SHADOW_LOCKED = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nkiln:!:19000::::::\nold:!!:19000::::::\n"


def write_shadow(root: Path, *extra: str) -> None:
    (root / "etc/shadow").write_text(SHADOW_LOCKED + "".join(f"{line}\n" for line in extra))


def write_agent_json(root: Path, config: dict[str, object], path: str = "usr/lib/kiln/agent.json") -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(json.dumps(config))


@pytest.mark.parametrize("lint, message, defect", DEFECTS, ids=[f"{d[0]}-{i}" for i, d in enumerate(DEFECTS)])
def test_defect_is_caught(lint: str, message: str, defect: Defect, tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    defect(root)
    findings = [f for f in lint_mod.run_lints(root) if f.lint == lint]
    assert findings, f"lint {lint} did not fire"
    assert any(message in f.message for f in findings), findings


def test_var_declared_in_tmpfiles_is_fine(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "var/lib/kiln").mkdir()
    (root / "usr/lib/tmpfiles.d/kiln.conf").write_text("d /var/lib/kiln 0750 root root -\n")
    assert "var-tmpfiles" not in names(root)


def test_development_image_may_have_authorized_keys(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, development=True)
    (root / "root/.ssh").mkdir(parents=True)
    (root / "root/.ssh/authorized_keys").write_text("ssh-ed25519 AAAA test")
    assert "production-access" not in names(root)


def test_locked_accounts_pass_and_development_images_may_have_passwords(tmp_path: Path) -> None:
    """Finding 5: locked (`*`, `!`, `!!`) accounts are fine anywhere; a development image may carry a
    password hash, never an empty password."""
    prod = make_rootfs(tmp_path / "prod")
    write_shadow(prod, "kiosk:!$6$salt$hash:19000::::::")
    assert not names(prod) & {"empty-passwords", "production-passwords"}
    dev = make_rootfs(tmp_path / "dev", development=True)
    write_shadow(dev, "root:$6$salt$0123456789abcdef:19000:0:99999:7:::")
    assert not names(dev) & {"empty-passwords", "production-passwords"}
    write_shadow(dev, "root::19000:0:99999:7:::")
    assert "empty-passwords" in names(dev) and "production-passwords" not in names(dev)


@pytest.mark.parametrize("setup", ["debian-bundle", "fedora-absolute-link", "insecure", "no-registry",
                                   "etc-makes-insecure"])
def test_ca_bundle_present_or_not_needed(tmp_path: Path, setup: str) -> None:
    """Finding 5: a TLS registry with a CA bundle (Debian's file, Fedora's absolute link resolved inside
    the rootfs), a plain-HTTP one, or none at all passes."""
    root = make_rootfs(tmp_path)
    write_agent_json(root, {"registry": "registry.example.com", "insecure": setup == "insecure"}
                     if setup != "no-registry" else {"channel": "stable"})
    if setup == "debian-bundle":
        (root / "etc/ssl/certs").mkdir(parents=True)
        (root / "etc/ssl/certs/ca-certificates.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    elif setup == "fedora-absolute-link":
        pem = root / "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"
        pem.parent.mkdir(parents=True)
        pem.write_text("-----BEGIN CERTIFICATE-----\n")
        (root / "etc/pki/tls/certs").mkdir(parents=True)
        (root / "etc/pki/tls/certs/ca-bundle.crt").symlink_to("/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem")
    elif setup == "etc-makes-insecure":
        write_agent_json(root, {"insecure": True}, "etc/kiln/agent.json")
    assert "ca-bundle" not in names(root)


def test_modinfo_reads_the_elf_section(tmp_path: Path) -> None:
    ko = tmp_path / "nvidia-current.ko"
    ko.write_bytes(make_ko({"version": NVIDIA, "vermagic": f"{KVER} SMP "}))
    assert lint_mod.modinfo(ko) == {"version": NVIDIA, "vermagic": f"{KVER} SMP "}
    xz = tmp_path / "nvidia-current.ko.xz"
    xz.write_bytes(lzma.compress(ko.read_bytes()))
    assert lint_mod.modinfo(xz)["version"] == NVIDIA
    (tmp_path / "junk.ko").write_bytes(b"not an ELF version=1\0")
    assert lint_mod.modinfo(tmp_path / "junk.ko") == {}


def _gpu_findings(root: Path, lint: str) -> list[str]:
    return [f.message for f in lint_mod.run_lints(root) if f.lint == lint]


@pytest.mark.parametrize("setup, lint, message", [
    (lambda r: None, "nvidia-vermagic", "no nvidia kernel module for kernel 6.1.0-28-amd64"),
    (lambda r: add_nvidia(r, kver="6.1.0-27-amd64"), "nvidia-vermagic",
     "vermagic '6.1.0-27-amd64 SMP preempt mod_unload modversions', the image's kernel is 6.1.0-28-amd64"),
    (lambda r: add_nvidia(r, lib_version="535.261.03"), "nvidia-userspace-version",
     "libcuda is 535.261.03, kernel module nvidia-current.ko is 535.309.01"),
    (lambda r: add_nvidia(r, kmod_version="535.261.03", lib_version="535.261.03"), "nvidia-userspace-version",
     "kernel module nvidia-current.ko is 535.261.03, release.json driverVersion is 535.309.01-0+deb12u1"),
    (lambda r: add_nvidia(r, cuda="13.0.48"), "cuda-driver-branch",
     "CUDA runtime 13.0.48 (CUDA 13) needs an NVIDIA driver >= 580; the image's is 535.309.01"),
    (lambda r: (add_nvidia(r), (r / "usr/bin").mkdir(parents=True), (r / "usr/bin/gcc-12").write_text("cc"),
                (r / "usr/src/linux-headers-6.1.0-28-amd64").mkdir(parents=True)), "no-build-tools",
     "build tools left in the image: /usr/bin/gcc-12, /usr/src/linux-headers-6.1.0-28-amd64"),
    (lambda r: (add_nvidia(r), (r / "var/lib/dkms").mkdir(parents=True)), "no-build-tools", "/var/lib/dkms"),
], ids=["no-module", "vermagic", "userspace", "release", "cuda13-on-535", "compiler-headers", "dkms-state"])
def test_nvidia_coherence(setup: Defect, lint: str, message: str, tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, accelerator="nvidia-dgpu")
    setup(root)
    found = _gpu_findings(root, lint)
    assert any(message in m for m in found), found


def test_userspace_read_through_links_inside_the_rootfs(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, accelerator="nvidia-dgpu")
    add_nvidia(root)
    stale = root / "usr/lib/x86_64-linux-gnu/nvidia/legacy/libcuda.so.470.256.02"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")  # not what libcuda.so.1 resolves to: not the loaded one
    assert lint_mod.userspace_versions(root, "libcuda") == {NVIDIA}
    assert _gpu_findings(root, "nvidia-userspace-version") == []


def test_cpu_image_has_no_gpu_findings_and_may_have_a_compiler(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/gcc").write_text("cc")  # no DKMS-built modules: nothing forbids it
    assert names(root) == set()


def test_warnings_do_not_fail_errors_do(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path)
    (root / "tmp/junk").write_text("x")
    lint_rootfs(root)  # warning only
    (root / "boot/vmlinuz").write_text("k")
    with pytest.raises(GateFailed, match="boot-empty"):
        lint_rootfs(root)


def test_lint_script_runs_standalone_with_exit_codes(tmp_path: Path) -> None:
    """As the image build's last step runs it: python3 -I /usr/lib/kiln/launch.py kiln-lint ROOT."""
    lint = [sys.executable, "-I", str(ROOT / "overlays/common/usr/lib/kiln/launch.py"), "kiln-lint"]
    root = make_rootfs(tmp_path)
    ok = subprocess.run([*lint, str(root)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (root / "boot/vmlinuz").write_text("k")
    bad = subprocess.run([*lint, str(root)], capture_output=True, text=True)
    assert bad.returncode == 1 and "error: boot-empty" in bad.stdout
    missing = subprocess.run([*lint, str(tmp_path / "nope")], capture_output=True)
    assert missing.returncode == 2
    usage = subprocess.run([*lint, "--bogus"], capture_output=True)
    assert usage.returncode == 2


def test_kiln_lint_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from builder.cli import main

    root = make_rootfs(tmp_path)
    (root / "etc/machine-id").write_text("abc\n")
    result = CliRunner().invoke(main, ["lint", str(root)])
    assert result.exit_code == 5
    assert "machine-id" in result.output
