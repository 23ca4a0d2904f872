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
    MODULES_DIR,
    RELEASE_JSON,
    under,
)

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
    fn: Callable[[Path, dict], Iterator[str]]


LINTS: list[Lint] = []
# Files container engines put into /run and /tmp while a RUN step executes.
ENGINE_FILES = {".containerenv", "secrets", "lock", "systemd"}
RUN_MAX_SHOWN = 5


def lint(name: str, severity: str, description: str):  # type: ignore[no-untyped-def]
    def register(fn):  # type: ignore[no-untyped-def]
        LINTS.append(Lint(name, severity, description, fn))
        return fn
    return register


def kernel_dirs(root: Path) -> list[Path]:
    mods = under(root, MODULES_DIR)
    return sorted(d for d in mods.iterdir() if d.is_dir()) if mods.is_dir() else []


def release_of(root: Path) -> dict:
    path = under(root, RELEASE_JSON)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@lint("kernel", ERROR, "exactly one kernel under /usr/lib/modules, with vmlinuz and initramfs.img")
def check_kernel(root: Path, release: dict) -> Iterator[str]:
    dirs = kernel_dirs(root)
    if len(dirs) != 1:
        names = ", ".join(d.name for d in dirs) or "none"
        yield f"expected exactly one kernel in /usr/lib/modules, found {len(dirs)} ({names})"
        return
    for name in ("vmlinuz", "initramfs.img"):
        if not (dirs[0] / name).is_file():
            yield f"/usr/lib/modules/{dirs[0].name}/{name} is missing"


@lint("boot-empty", ERROR, "/boot is empty: kernels live in /usr/lib/modules/$kver/")
def check_boot_empty(root: Path, release: dict) -> Iterator[str]:
    boot = root / "boot"
    if boot.is_dir():
        files = sorted(str(p.relative_to(root)) for p in boot.rglob("*") if not p.is_dir())
        if files:
            yield f"/boot is not empty: {', '.join(files[:RUN_MAX_SHOWN])}"


@lint("run-empty", ERROR, "nothing baked into /run (a tmpfs at boot)")
def check_run_empty(root: Path, release: dict) -> Iterator[str]:
    yield from _not_empty(root, "run")


@lint("tmp-empty", WARNING, "nothing baked into /tmp")
def check_tmp_empty(root: Path, release: dict) -> Iterator[str]:
    yield from _not_empty(root, "tmp")


def _not_empty(root: Path, name: str) -> Iterator[str]:
    d = root / name
    if d.is_dir():
        extra = sorted(p.name for p in d.iterdir() if p.name not in ENGINE_FILES)
        if extra:
            yield f"/{name} is not empty: {', '.join(extra[:RUN_MAX_SHOWN])}"


@lint("var-run", ERROR, "/var/run is a symlink to /run")
def check_var_run(root: Path, release: dict) -> Iterator[str]:
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
def check_var_tmpfiles(root: Path, release: dict) -> Iterator[str]:
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


@lint("release", ERROR, f"{RELEASE_JSON} names class, compatible and version")
def check_release(root: Path, release: dict) -> Iterator[str]:
    if not under(root, RELEASE_JSON).is_file():
        yield f"{RELEASE_JSON} is missing"
        return
    for key in ("class", "compatible", "version", "models"):
        if not release.get(key):
            yield f"{RELEASE_JSON} has no {key!r}"


@lint("kargs", ERROR, f"kernel arguments in {KARGS_DIR}/*.toml parse as a list of strings")
def check_kargs(root: Path, release: dict) -> Iterator[str]:
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
def check_models(root: Path, release: dict) -> Iterator[str]:
    for m in release.get("models", []) if isinstance(release.get("models"), list) else []:
        path = root / str(m.get("path", "")).lstrip("/")
        if not path.is_file():
            yield f"model {m.get('name')}: {m.get('path')} is missing"
        elif hashlib.sha256(path.read_bytes()).hexdigest() != m.get("sha256"):
            yield f"model {m.get('name')}: {m.get('path')} does not match its sha256 in release.json"


@lint("ssh-host-keys", ERROR, "no SSH host keys baked in (generated on first boot)")
def check_ssh_host_keys(root: Path, release: dict) -> Iterator[str]:
    keys = sorted((root / "etc/ssh").glob("ssh_host_*")) if (root / "etc/ssh").is_dir() else []
    if keys:
        yield f"baked SSH host keys: {', '.join(k.name for k in keys[:RUN_MAX_SHOWN])}"


@lint("machine-id", ERROR, "/etc/machine-id is absent or empty (set on first boot)")
def check_machine_id(root: Path, release: dict) -> Iterator[str]:
    p = root / "etc/machine-id"
    if p.is_file() and p.read_text().strip() not in ("", "uninitialized"):
        yield "/etc/machine-id is set in the image; every device would share it"


@lint("production-access", ERROR, "production images carry no authorized SSH keys")
def check_production_access(root: Path, release: dict) -> Iterator[str]:
    if release.get("development"):
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
def check_empty_passwords(root: Path, release: dict) -> Iterator[str]:
    empty = [name for name, field in shadow_entries(root) if field == ""]
    if empty:
        yield f"/etc/shadow: empty password for {', '.join(empty[:RUN_MAX_SHOWN])} (lock it: passwd -l)"


@lint("production-passwords", ERROR, "production images: no account in /etc/shadow has a usable password")
def check_production_passwords(root: Path, release: dict) -> Iterator[str]:
    if release.get("development"):
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
def check_ca_bundle(root: Path, release: dict) -> Iterator[str]:
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


MODINFO_VERSION = re.compile(rb"(?:^|\x00)version=([0-9][0-9A-Za-z.+~-]*)\x00")


def module_version(path: Path) -> str | None:
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    m = MODINFO_VERSION.search(data)
    return m.group(1).decode() if m else None


@lint("gpu-driver", ERROR, "NVIDIA classes: kernel module built for the exact kernel, version = userspace driver")
def check_gpu_driver(root: Path, release: dict) -> Iterator[str]:
    if release.get("accelerator") != "nvidia-dgpu":
        return
    want = release.get("driverVersion")
    dirs = kernel_dirs(root)
    if len(dirs) != 1:
        return  # the kernel lint reports it
    mods = [p for p in dirs[0].rglob("nvidia*.ko*") if re.fullmatch(r"nvidia(-current)?\.ko(\.xz)?", p.name)]
    if not mods:
        yield f"no nvidia kernel module for kernel {dirs[0].name}"
        return
    have = module_version(mods[0])
    if have != want:
        yield f"kernel module {mods[0].name} is version {have}, release.json says {want}"
    libs = sorted(root.glob("usr/lib/*/libnvidia-ml.so.*.*")) + sorted(root.glob("usr/lib64/libnvidia-ml.so.*.*"))
    user = {p.name.split(".so.", 1)[1] for p in libs}
    if not user:
        yield "no userspace driver (libnvidia-ml.so.<version>) found"
    elif want not in user:
        yield f"userspace driver is {', '.join(sorted(user))}, kernel module is {have}"


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
