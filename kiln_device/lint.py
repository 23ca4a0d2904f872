"""Kiln's image lints: a registry of named checks with severities, over a rootfs.

Runs as the last step of every image build (`python3 /usr/lib/kiln/launch.py kiln-lint /`)
and on an unpacked rootfs from the build machine (`kiln lint ROOTFS`). Standard library only: it runs inside
images and must not import anything from the builder.

Exit codes: 0 no errors (warnings allowed), 1 at least one error, 2 bad usage.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import struct
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln_device.common import Parser
from kiln_device.contract import (
    AGENT_JSON,
    AGENT_OVERRIDE_JSON,
    DEV_AUTHORIZED_KEYS,
    KARGS_DIR,
    RELEASE_JSON,
    Release,
    parse_release,
    under,
)
from kiln_device.kernel import INITRD, VMLINUZ, find_kernels, kernel_dirs, why_not_bootable

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    lint: str
    severity: str
    message: str


@dataclass(frozen=True)
class Lint:
    name: str
    severity: str
    description: str
    fn: Callable[[Path, Release | None], Iterator[str]]


LINTS: list[Lint] = []
# Files container engines put into /run and /tmp while a RUN step executes.
ENGINE_FILES = {".containerenv", "secrets", "lock", "systemd"}
RUN_MAX_SHOWN = 5


def lint(name: str, severity: str, description: str):  # type: ignore[no-untyped-def]
    def register(fn):  # type: ignore[no-untyped-def]
        LINTS.append(Lint(name, severity, description, fn))
        return fn
    return register


def release_of(root: Path) -> Release | None:
    """The image's release.json (None: missing or malformed, which the `release` lint reports)."""
    try:
        return read_release(root)
    except (OSError, ValueError):
        return None


def read_release(root: Path) -> Release:
    """OSError when unreadable; ValueError (a ContractError naming the field) when malformed."""
    return parse_release(json.loads(under(root, RELEASE_JSON).read_text()), RELEASE_JSON)


@lint("kernel", ERROR, "exactly one kernel under /usr/lib/modules, with vmlinuz (an EFI image, not gzip) "
                      "and initramfs.img")
def check_kernel(root: Path, release: Release | None) -> Iterator[str]:
    dirs = kernel_dirs(root)
    if len(dirs) != 1:
        names = ", ".join(d.name for d in dirs) or "none"
        yield f"expected exactly one kernel in /usr/lib/modules, found {len(dirs)} ({names})"
        return
    for name in (VMLINUZ, INITRD):
        if not (dirs[0] / name).is_file():
            yield f"/usr/lib/modules/{dirs[0].name}/{name} is missing"
    for boot in find_kernels(root):
        why = why_not_bootable(boot.vmlinuz)
        if why is not None:
            yield f"/usr/lib/modules/{boot.version}/vmlinuz {why}"


@lint("boot-empty", ERROR, "/boot is empty: kernels live in /usr/lib/modules/$kver/")
def check_boot_empty(root: Path, release: Release | None) -> Iterator[str]:
    boot = root / "boot"
    if boot.is_dir():
        files = sorted(str(p.relative_to(root)) for p in boot.rglob("*") if not p.is_dir())
        if files:
            yield f"/boot is not empty: {', '.join(files[:RUN_MAX_SHOWN])}"


@lint("run-empty", ERROR, "nothing baked into /run (a tmpfs at boot)")
def check_run_empty(root: Path, release: Release | None) -> Iterator[str]:
    yield from _not_empty(root, "run")


@lint("tmp-empty", WARNING, "nothing baked into /tmp")
def check_tmp_empty(root: Path, release: Release | None) -> Iterator[str]:
    yield from _not_empty(root, "tmp")


def _not_empty(root: Path, name: str) -> Iterator[str]:
    d = root / name
    if d.is_dir():
        extra = sorted(p.name for p in d.iterdir() if p.name not in ENGINE_FILES)
        if extra:
            yield f"/{name} is not empty: {', '.join(extra[:RUN_MAX_SHOWN])}"


@lint("var-run", ERROR, "/var/run is a symlink to /run")
def check_var_run(root: Path, release: Release | None) -> Iterator[str]:
    p = root / "var/run"
    if not p.is_symlink():
        yield "/var/run is not a symlink"
    elif str(p.readlink()).rstrip("/") not in ("/run", "../run"):
        yield f"/var/run points to {p.readlink()}, not /run"


TMPFILES_LINE = re.compile(r"^[dDvqQLCzZeTxXrRwfF]\+?!?\s+(/var/\S+)")
VAR_ALLOWED = ("var/lib/dpkg", "var/lib/rpm", "var/lib/apt", "var/lib/systemd", "var/cache",
               "var/log", "var/tmp", "var/lib/dnf", "var/lib/ucf", "var/lib/pam",
               "var/lib/sgml-base", "var/lib/xml-core", "var/lib/python", "var/lib/polkit-1",
               "var/mail", "var/spool", "var/opt", "var/local", "var/backups", "var/lib/misc")


@lint("var-tmpfiles", WARNING, "content in /var is declared in tmpfiles.d (it is a per-device overlay)")
def check_var_tmpfiles(root: Path, release: Release | None) -> Iterator[str]:
    declared = set()
    for d in (root / "usr/lib/tmpfiles.d", root / "etc/tmpfiles.d"):
        for conf in sorted(d.glob("*.conf")) if d.is_dir() else []:
            for line in conf.read_text(errors="replace").splitlines():
                m = TMPFILES_LINE.match(line.strip())
                if m:
                    declared.add(m.group(1).lstrip("/"))
    undeclared = []
    for p in sorted((root / "var/lib").glob("*")) if (root / "var/lib").is_dir() else []:
        rel = str(p.relative_to(root))
        if not any(rel == a or rel.startswith(a + "/") for a in VAR_ALLOWED) and rel not in declared:
            undeclared.append("/" + rel)
    if undeclared:
        yield f"not in tmpfiles.d: {', '.join(undeclared[:RUN_MAX_SHOWN])}"


@lint("release", ERROR, f"{RELEASE_JSON} is a release record (docs/device-contract.md) that lists models")
def check_release(root: Path, release: Release | None) -> Iterator[str]:
    if not under(root, RELEASE_JSON).is_file():
        yield f"{RELEASE_JSON} is missing"
        return
    try:
        release = read_release(root)
    except (OSError, ValueError) as exc:
        yield str(exc)
        return
    if not release.models:
        yield f"{RELEASE_JSON} lists no models"


@lint("kargs", ERROR, f"kernel arguments in {KARGS_DIR}/*.toml parse as a list of strings")
def check_kargs(root: Path, release: Release | None) -> Iterator[str]:
    d = under(root, KARGS_DIR)
    for path in sorted(d.glob("*.toml")) if d.is_dir() else []:
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            yield f"{path.relative_to(root)}: {exc}"
            continue
        kargs = data.get("kargs")
        if not isinstance(kargs, list) or not all(isinstance(k, str) for k in kargs):
            yield f"{path.relative_to(root)}: 'kargs' must be a list of strings"


@lint("models", ERROR, "every model in release.json is present with its digest")
def check_models(root: Path, release: Release | None) -> Iterator[str]:
    for m in release.models if release is not None else ():
        path = under(root, m.path)
        if not path.is_file():
            yield f"model {m.name}: {m.path} is missing"
        elif hashlib.sha256(path.read_bytes()).hexdigest() != m.sha256:
            yield f"model {m.name}: {m.path} does not match its sha256 in release.json"


@lint("ssh-host-keys", ERROR, "no SSH host keys baked in (generated on first boot)")
def check_ssh_host_keys(root: Path, release: Release | None) -> Iterator[str]:
    keys = sorted((root / "etc/ssh").glob("ssh_host_*")) if (root / "etc/ssh").is_dir() else []
    if keys:
        yield f"baked SSH host keys: {', '.join(k.name for k in keys[:RUN_MAX_SHOWN])}"


@lint("machine-id", ERROR, "/etc/machine-id is absent or empty (set on first boot)")
def check_machine_id(root: Path, release: Release | None) -> Iterator[str]:
    p = root / "etc/machine-id"
    if p.is_file() and p.read_text().strip() not in ("", "uninitialized"):
        yield "/etc/machine-id is set in the image; every device would share it"


@lint("production-access", ERROR, "production images carry no authorized SSH keys")
def check_production_access(root: Path, release: Release | None) -> Iterator[str]:
    if release is not None and release.development:
        return
    keys = [root / "root/.ssh/authorized_keys", under(root, DEV_AUTHORIZED_KEYS)]
    for p in [*keys, *sorted((root / "home").glob("*/.ssh/authorized_keys"))]:
        if p.exists():
            yield f"{p.relative_to(root)} exists in a production image"


def shadow_entries(root: Path) -> Iterator[tuple[str, str]]:
    """(account, password field) of each line of /etc/shadow."""
    path = root / "etc/shadow"
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if line.strip() and not line.startswith("#"):
            fields = line.split(":")
            yield fields[0], fields[1] if len(fields) > 1 else ""


def locked_password(field: str) -> bool:
    """`*`, `!`, `!!`, `!<hash>` (locked), `x`: no password logs in. Anything else is a hash."""
    return field.startswith(("!", "*")) or field == "x"


@lint("empty-passwords", ERROR, "no account in /etc/shadow has an empty password field (login without one)")
def check_empty_passwords(root: Path, release: Release | None) -> Iterator[str]:
    empty = [name for name, field in shadow_entries(root) if field == ""]
    if empty:
        yield f"/etc/shadow: empty password for {', '.join(empty[:RUN_MAX_SHOWN])} (lock it: passwd -l)"


@lint("production-passwords", ERROR, "production images: no account in /etc/shadow has a usable password")
def check_production_passwords(root: Path, release: Release | None) -> Iterator[str]:
    if release is not None and release.development:
        return
    usable = [name for name, field in shadow_entries(root) if field and not locked_password(field)]
    if usable:
        yield f"/etc/shadow: a password hash for {', '.join(usable[:RUN_MAX_SHOWN])} in a production image"


CA_BUNDLES = ("etc/ssl/certs/ca-certificates.crt", "etc/pki/tls/certs/ca-bundle.crt")


def nonempty_file_in(root: Path, rel: str) -> bool:
    """Whether root/rel is a non-empty file, following symlinks inside `root` (Fedora's ca-bundle.crt
    links to /etc/pki/ca-trust/...: absolute, which must not resolve on the build host)."""
    path = root / rel
    for _ in range(16):
        if not path.is_symlink():
            return path.is_file() and path.stat().st_size > 0
        target = path.readlink()
        path = root / str(target).lstrip("/") if target.is_absolute() else path.parent / target
    return False


@lint("ca-bundle", ERROR, "an image that updates over TLS (agent.json registry, not insecure) has a CA bundle")
def check_ca_bundle(root: Path, release: Release | None) -> Iterator[str]:
    config: dict = {}
    for device_path in (AGENT_JSON, AGENT_OVERRIDE_JSON):  # the agent's own order: /etc overrides key by key
        try:
            data = json.loads(under(root, device_path).read_text())
        except (OSError, ValueError):
            continue
        config |= data if isinstance(data, dict) else {}
    if not config.get("registry") or config.get("insecure"):
        return
    if not any(nonempty_file_in(root, p) for p in CA_BUNDLES):
        yield (f"agent.json names registry {config['registry']} over TLS, but the image has no CA bundle "
               f"(/{' or /'.join(CA_BUNDLES)}): install ca-certificates")


# --- NVIDIA coherence: proven on the built rootfs, from files only (no modinfo, no dpkg) -----------

# The lowest driver branch that runs each CUDA major's runtime through CUDA minor-version
# compatibility (NVIDIA's "CUDA Toolkit and Corresponding Driver Versions" table, CUDA release
# notes, table 2/3: CUDA 11.x >= 450.80.02, CUDA 12.x >= 525.60.13, CUDA 13.x >= 580.65.06).
# builder.spec.rules refuses a spec that breaks it; the cuda-driver-branch lint proves it on the image.
CUDA_MIN_DRIVER = {11: 450, 12: 525, 13: 580}
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib64", "usr/lib")
VENV_SITE = "usr/lib/kiln/venv/lib"
# What builds kernel modules and must stay in the throwaway build stage (kernelModules: image).
BUILD_TOOLS = ("usr/bin/gcc", "usr/bin/cc", "usr/bin/x86_64-linux-gnu-gcc-12", "usr/bin/make", "usr/sbin/dkms",
               "usr/lib/gcc", "var/lib/dkms")
BUILD_TOOL_GLOBS = ("usr/bin/gcc-*", "usr/bin/*-linux-gnu-gcc*", "usr/src/linux-headers-*", "usr/src/nvidia-*")


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """The bytes of section `wanted` of a little-endian ELF64 file (a kernel module), or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    try:
        shoff = struct.unpack_from("<Q", data, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names_at = headers[shstrndx][4]
        for h in headers:
            name = data[names_at + h[0]:data.index(b"\0", names_at + h[0])].decode()
            if name == wanted:
                return data[h[4]:h[4] + h[5]]
    except (struct.error, IndexError, ValueError, UnicodeDecodeError):
        return None
    return None


def modinfo(path: Path) -> dict[str, str]:
    """A module's .modinfo (key=value strings; the first of a repeated key), from .ko or .ko.xz."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    section = elf_section(data, ".modinfo") or b""
    info: dict[str, str] = {}
    for item in section.split(b"\0"):
        key, eq, value = item.decode(errors="replace").partition("=")
        if eq:
            info.setdefault(key, value)
    return info


def nvidia_modules(kdir: Path) -> list[Path]:
    return sorted(p for p in kdir.rglob("nvidia*.ko*") if re.fullmatch(r"nvidia[\w-]*\.ko(\.xz)?", p.name))


def main_module(mods: list[Path]) -> Path | None:
    """nvidia.ko (upstream name) or nvidia-current.ko (Debian's)."""
    return next((p for p in mods if p.name.split(".ko")[0] in ("nvidia", "nvidia-current")), None)


def resolve_in(root: Path, path: Path) -> Path | None:
    """Follow symlinks inside `root` (Debian's /etc/alternatives links are absolute)."""
    for _ in range(16):
        if not path.is_symlink():
            return path if path.is_file() else None
        target = path.readlink()
        path = root / str(target).lstrip("/") if target.is_absolute() else path.parent / target
    return None


def userspace_versions(root: Path, lib: str) -> set[str]:
    """Versions of `lib` (libcuda, libnvidia-ml) the loader finds: what `<lib>.so.1` resolves to
    inside the rootfs, else every `<lib>.so.<version>` file."""
    found = set()
    for d in LIB_DIRS:
        link = root / d / f"{lib}.so.1"
        real = resolve_in(root, link) if link.is_symlink() or link.exists() else None
        if real is not None and ".so." in real.name and real.name.split(".so.", 1)[1].count(".") >= 1:
            found.add(real.name.split(".so.", 1)[1])
    if not found:
        for d in LIB_DIRS:
            base = root / d
            if base.is_dir():
                found |= {p.name.split(".so.", 1)[1] for p in base.rglob(f"{lib}.so.*.*") if p.is_file()}
    return found


def cuda_runtime_version(root: Path) -> str | None:
    """The version of the venv's CUDA runtime wheel (nvidia-cuda-runtime-cu12, or -runtime for CUDA 13)."""
    site = root / VENV_SITE
    metas = sorted(site.glob("python*/site-packages/nvidia_cuda_runtime*.dist-info/METADATA")) if site.is_dir() else []
    for meta in metas:
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def _nvidia(root: Path) -> tuple[Path, list[Path]] | None:
    dirs = kernel_dirs(root)
    if len(dirs) != 1:
        return None  # the kernel lint reports it
    return dirs[0], nvidia_modules(dirs[0])


@lint("nvidia-vermagic", ERROR, "every nvidia*.ko was built for the image's kernel (vermagic starts with it)")
def check_nvidia_vermagic(root: Path, release: Release | None) -> Iterator[str]:
    found = _nvidia(root)
    if found is None:
        return
    kdir, mods = found
    if not mods:
        if release is not None and release.accelerator == "nvidia-dgpu":
            yield f"no nvidia kernel module for kernel {kdir.name}"
        return
    for mod in mods:
        vermagic = modinfo(mod).get("vermagic", "")
        if not vermagic.startswith(kdir.name + " "):
            yield (f"{mod.relative_to(root)}: vermagic {vermagic.strip() or '(none)'!r}, "
                   f"the image's kernel is {kdir.name}")


@lint("nvidia-userspace-version", ERROR, "libcuda and libnvidia-ml are the kernel module's version")
def check_nvidia_userspace(root: Path, release: Release | None) -> Iterator[str]:
    found = _nvidia(root)
    mod = main_module(found[1]) if found else None
    if mod is None:
        return
    version = modinfo(mod).get("version")
    for lib in ("libcuda", "libnvidia-ml"):
        have = userspace_versions(root, lib)
        if not have:
            yield f"no {lib}.so.<version> in the image (kernel module {mod.name} is {version})"
        elif have != {version}:
            yield f"{lib} is {', '.join(sorted(have))}, kernel module {mod.name} is {version}"
    want = (release.driver_version if release is not None else None) or ""
    upstream = want.split(":", 1)[-1].split("-", 1)[0]
    if want and release is not None and release.accelerator == "nvidia-dgpu" and upstream != version:
        yield f"kernel module {mod.name} is {version}, release.json driverVersion is {want}"


@lint("cuda-driver-branch", ERROR, "the venv's CUDA runtime major is one the driver branch runs")
def check_cuda_driver_branch(root: Path, release: Release | None) -> Iterator[str]:
    cuda = cuda_runtime_version(root)
    found = _nvidia(root)
    mod = main_module(found[1]) if found else None
    if cuda is None or mod is None:
        return
    driver = modinfo(mod).get("version", "")
    major, branch = cuda.split(".", 1)[0], driver.split(".", 1)[0]
    need = CUDA_MIN_DRIVER.get(int(major)) if major.isdigit() else None
    if need is None:
        yield f"CUDA runtime {cuda}: no known minimum driver for CUDA {major}"
    elif not branch.isdigit() or int(branch) < need:
        yield f"CUDA runtime {cuda} (CUDA {major}) needs an NVIDIA driver >= {need}; the image's is {driver}"


@lint("no-build-tools", ERROR, "an image whose kernel modules were built by DKMS carries no compiler, headers or DKMS")
def check_no_build_tools(root: Path, release: Release | None) -> Iterator[str]:
    if not any((d / "updates/dkms").is_dir() for d in kernel_dirs(root)):
        return
    present = [rel for rel in BUILD_TOOLS if (root / rel).exists() or (root / rel).is_symlink()]
    for pattern in BUILD_TOOL_GLOBS:
        present += sorted(str(p.relative_to(root)) for p in root.glob(pattern))
    if present:
        yield f"build tools left in the image: /{', /'.join(present[:RUN_MAX_SHOWN])}"


def run_lints(root: Path, only: set[str] | None = None) -> list[Finding]:
    release = release_of(root)
    findings = []
    for item in LINTS:
        if only and item.name not in only:
            continue
        for message in item.fn(root, release):
            findings.append(Finding(item.name, item.severity, message))
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="kiln-lint", description="Lint a Kiln image rootfs.", usage_code=2)
    parser.add_argument("root", type=Path, nargs="?", default=Path("/"),
                        help="the rootfs directory (default /, inside an image build)")
    parser.add_argument("--json", action="store_true", help="print findings as JSON")
    parser.add_argument("--list", action="store_true", help="list the lints and exit")
    args = parser.parse_args(argv)
    if args.list:
        for item in LINTS:
            print(f"{item.name:18} {item.severity:8} {item.description}")
        return 0
    if not args.root.is_dir():
        print(f"kiln-lint: {args.root} is not a directory", file=sys.stderr)
        return 2
    findings = run_lints(args.root)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        for f in findings:
            print(f"kiln-lint: {f.severity}: {f.lint}: {f.message}")
        errors = sum(f.severity == ERROR for f in findings)
        print(f"kiln-lint: {len(LINTS)} lints, {errors} errors, {len(findings) - errors} warnings")
    return 1 if any(f.severity == ERROR for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
