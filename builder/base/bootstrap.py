"""The offline base image: a Debian rootfs from mmdebstrap, loaded into container storage.

No registry is reachable on the embedded build machine, so `FROM debian` cannot
be pulled. `make_base()` bootstraps a minimal bootable Debian with mmdebstrap
(the Debian mirror is reachable) and loads it as `localhost/kiln/base/debian:<release>`
(builder.spec.names.offline_base_ref).

Reproducible: with SOURCE_DATE_EPOCH fixed, the same inputs and mirror content
give a byte-identical tarball; the image config is written here (not by
`podman import`, which stamps the current time), so the image id is the same
on every machine that builds the same tarball.

Cached: `<state>/base/debian-<release>-<arch>/stamp.json` records the inputs; a
second call with the same inputs is a no-op. The stamp is removed before any
work starts and written only after each step succeeded, so a failure leaves
nothing a later call would trust.

What goes in the base: what every Debian class needs to boot and be updated
(kernel in /usr/lib/modules/$kver/vmlinuz + modules, systemd as init, udev, dbus, kmod, initramfs-tools, zstd,
e2fsprogs, systemd-boot with bless-boot, usr-is-merged rather than usrmerge and its perl). Not in the
base: the initramfs (every class regenerates it with Kiln's overlay hook; see INITRD=No below),
networking, ssh, python, ca-certificates, firmware: the class Containerfile
installs those.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import shlex
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from builder.base.emulation import check_emulation
from builder.base.mirrors import BaseMirror, finalize_base_mirror, finalize_mirrors
from builder.core.context import Context
from builder.core.engine import Engine
from builder.core.errors import BuildError, CommandFailed, KilnError, ToolMissing
from builder.core.files import sha256_file, write_json_atomic
from builder.core.run import VERBOSE, run, run_streaming
from builder.core.state import StateDir
from builder.core.versions import DEFAULT_EPOCH
from builder.spec import names
from builder.spec.schema import Architecture, BaseSource, Family, HardwareClass

RECIPE_VERSION = 3  # bump when hooks or the image config change meaningfully
DEFAULT_RELEASE = "bookworm"

BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",  # /sbin/init
    "udev",
    "dbus",  # systemctl, logind, hostnamectl
    "kmod",
    "initramfs-tools",
    "zstd",  # initramfs compression (initramfs-tools only recommends it)
    "e2fsprogs",  # fsck and tune2fs for the ext4 data partition
    "systemd-boot",  # bootctl + systemd-bless-boot (boot assessment)
)

# The essential init-system-helpers needs `usrmerge | usr-is-merged`; left to apt, the essential phase
# takes usrmerge, and with it perl and its modules (57 MB uncompressed). mmdebstrap's own merged-usr
# hooks make the /bin, /lib, /sbin links debootstrap's way and install the usr-is-merged marker first.
# (An --include of usr-is-merged comes too late: the essential set is installed before it.)
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")

# Kept in the image as /etc/dpkg/dpkg.cfg.d/99mmdebstrap, so packages the class
# Containerfile installs later are trimmed the same way.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",  # licences stay: they feed the SBOM
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/bug/*",
    "path-exclude=/boot/System.map-*",  # symbols for debugging; nothing on a device reads them
)

CUSTOMIZE_HOOKS = (
    # mmdebstrap copies these from the host; they would differ between machines.
    'rm -f "$1/etc/resolv.conf" "$1/etc/hostname"',
    # apt hands these to _apt, or leaves them to root when _apt cannot reach the
    # temporary rootfs (a TMPDIR under a 0700 directory): the tarball would depend
    # on the state dir's parents. Debian's default owner, always.
    'chroot "$1" chown _apt:root /var/cache/apt/archives/partial /var/lib/apt/lists/partial',
    # The kernel where a bootc-style image keeps it. Left in /boot, the class's kernel layer would
    # move it and the image would carry it twice: in the base, and again in that layer (issue 18).
    # Debian's arm64 vmlinuz is gzip, which systemd-boot cannot start (systemd #23788): it is kept
    # uncompressed, the EFI image inside (kiln_device.kernel checks it on every path that stages it).
    'for k in "$1"/boot/vmlinuz-*; do [ -e "$k" ] || continue; '
    'd="$1/usr/lib/modules/${k##*/vmlinuz-}/vmlinuz"; '
    'if gzip -t "$k" 2>/dev/null; then gzip -dc "$k" > "$d" && touch -r "$k" "$d" && rm "$k" || exit 1; '
    'else mv "$k" "$d" || exit 1; fi; done',
)


@dataclass(frozen=True, kw_only=True)
class BaseRecipe:
    """Every input that decides the base tarball (the cache key)."""

    release: str
    arch: Architecture
    mirror: str
    security_mirror: str | None
    components: tuple[str, ...]
    snapshot: str | None
    packages: tuple[str, ...]
    epoch: int
    # Set when this base stands in for an unreachable snapshot (spec.base.fallbackMirror): the
    # snapshot it replaces. The base is then named `<release>-unpinned-<id>`, never the snapshot.
    stands_in_for: str | None = None
    # spec.kernel.dropModules: module directories (under kernel/) left out by dpkg; the base is then
    # named `...-modules-<id>` (names.finalize_modules_id), so classes that keep them never share it.
    drop_modules: tuple[str, ...] = ()

    @property
    def dpkg_excludes(self) -> tuple[str, ...]:
        """DPKG_EXCLUDES and the dropped module directories (bookworm's kernel packages ship
        /lib/modules, later releases /usr/lib/modules: both are named)."""
        modules = tuple(f"path-exclude={root}/modules/*/kernel/{d}/*"
                        for d in self.module_dirs for root in ("/lib", "/usr/lib"))
        return (*DPKG_EXCLUDES, *modules)

    @property
    def module_dirs(self) -> tuple[str, ...]:
        """The dropped directories, sorted and without slashes at the ends: the same set gives the same
        base (its cache key, its name and the bytes of its dpkg configuration) in any order."""
        return names.finalize_module_dirs(self.drop_modules)

    @property
    def modules_id(self) -> str | None:
        return names.finalize_modules_id(self.drop_modules) if self.drop_modules else None

    @property
    def debian_arch(self) -> str:
        return self.arch.debian_arch

    @property
    def all_packages(self) -> tuple[str, ...]:
        return (*self.packages, f"linux-image-{self.debian_arch}")

    @property
    def unpinned_id(self) -> str | None:
        return names.finalize_unpinned_id(self.mirror, self.components) if self.stands_in_for else None

    @property
    def ref(self) -> str:
        return names.offline_base_ref(self.release, self.arch, self.snapshot, unpinned=self.unpinned_id,
                                      modules=self.modules_id)

    @property
    def name(self) -> str:
        """The cache directory: one per distinct base (a snapshot and its fallback never share one)."""
        tag = self.release + (f"-{self.snapshot}" if self.snapshot else "")
        tag += f"-unpinned-{self.unpinned_id}" if self.unpinned_id else ""
        tag += f"-modules-{self.modules_id}" if self.modules_id else ""
        return f"debian-{tag}-{self.arch}"

    def sources(self) -> list[str]:
        comps = " ".join(self.components)
        lines = [
            f"deb {self.mirror} {self.release} {comps}",
            f"deb {self.mirror} {self.release}-updates {comps}",
        ]
        if self.security_mirror:
            lines.append(f"deb {self.security_mirror} {self.release}-security {comps}")
        return lines

    def inputs(self) -> dict[str, Any]:
        return {
            "recipe": RECIPE_VERSION,
            "release": self.release,
            "arch": self.arch.value,
            "sources": self.sources(),
            "packages": sorted(self.all_packages),
            "dpkg": list(self.dpkg_excludes),
            "hooks": list(CUSTOMIZE_HOOKS),
            "hookDir": MERGED_USR_HOOKS.name,
            "epoch": self.epoch,
        }


@dataclass(frozen=True)
class BaseImage:
    ref: str
    image_id: str
    tarball: Path
    tarball_sha256: str
    kernel: str
    packages: Path  # "name<TAB>version" per line, from dpkg-query
    built: bool  # False when the cache answered


@dataclass(frozen=True)
class BasePaths:
    root: Path

    @property
    def tarball(self) -> Path:
        return self.root / "rootfs.tar"

    @property
    def packages(self) -> Path:
        return self.root / "packages.txt"

    @property
    def stamp(self) -> Path:
        return self.root / "stamp.json"

    @property
    def archive(self) -> Path:
        return self.root / "image.tar.tmp"

    @property
    def lock(self) -> Path:
        return self.root / "lock"


def make_base_for_class(ctx: Context, hc: HardwareClass, mirror: BaseMirror | None = None, *,
                        force: bool = False) -> BaseImage:
    """The offline base a class builds FROM (`kiln build` calls this when it is missing), from
    `mirror` (default: finalize_base_mirror, which probes). `force`: bootstrap it again even when
    the cached one is current (`kiln base --class CLASS --force`)."""
    base = hc.spec.base
    if base.source is not BaseSource.bootstrap or base.family is not Family.debian:
        raise BuildError(
            f"{hc.name}: Kiln bootstraps Debian bases only; this class needs a "
            f"{base.family.value} {base.source.value} base ({base.image or base.release})"
        )
    mirror = mirror or finalize_base_mirror(hc)
    if mirror.fallback:
        _say(f"{hc.name}: {mirror.note}")
    return make_base(
        ctx,
        base.release or DEFAULT_RELEASE,
        hc.spec.architecture.value,
        mirror=mirror.url if mirror.fallback else base.mirror,
        components=tuple(base.components),
        snapshot=mirror.snapshot,
        stands_in_for=base.snapshot if mirror.fallback else None,
        drop_modules=tuple(hc.spec.kernel.drop_modules),
        force=force,
    )


def make_base(
    ctx: Context,
    release: str = DEFAULT_RELEASE,
    arch: str = "x86_64",
    *,
    mirror: str | None = None,
    components: tuple[str, ...] = ("main",),
    snapshot: str | None = None,
    packages: tuple[str, ...] = BASE_PACKAGES,
    epoch: int = DEFAULT_EPOCH,
    force: bool = False,
    stands_in_for: str | None = None,
    drop_modules: tuple[str, ...] = (),
) -> BaseImage:
    """Bootstrap (or reuse) the offline base and make sure the engine has it.

    `mirror` defaults to deb.debian.org (its -security twin is derived);
    `snapshot` (YYYYMMDDTHHMMSSZ) pins snapshot.debian.org instead, for a
    tarball that stays byte-identical over time. `force` rebuilds regardless.
    `stands_in_for` (a snapshot): this base from `mirror` replaces that unreachable snapshot and is
    named `<release>-unpinned-<id>` (builder.spec.names.offline_base_ref). `drop_modules` (module
    directories under kernel/, spec.kernel.dropModules) are left out of the base.
    """
    if stands_in_for and snapshot:
        raise BuildError("a fallback base is bootstrapped from its mirror, not from a snapshot")
    try:
        architecture = Architecture(arch)
    except ValueError:
        known = ", ".join(a.value for a in Architecture)
        raise BuildError(f"no Debian base for architecture {arch!r}; known: {known}") from None
    main_mirror, security_mirror = finalize_mirrors(mirror, snapshot)
    recipe = BaseRecipe(
        release=release, arch=architecture, mirror=main_mirror, security_mirror=security_mirror,
        components=tuple(components), snapshot=snapshot, packages=tuple(packages), epoch=epoch,
        stands_in_for=stands_in_for, drop_modules=tuple(drop_modules),
    )  # fmt: skip
    paths = BasePaths(ctx.state.base_dir / recipe.name)
    paths.root.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(paths.lock):
            return _make_base_locked(ctx, recipe, paths, force)
    except KilnError as exc:
        raise exc.with_context(f"making base {recipe.ref}") from exc.__cause__


def _make_base_locked(ctx: Context, recipe: BaseRecipe, paths: BasePaths, force: bool) -> BaseImage:
    engine = ctx.engine
    tool_version = finalize_mmdebstrap_version()
    stamp = read_stamp(paths.stamp)
    fresh = not force and stamp is not None and _stamp_matches(stamp, recipe, tool_version)
    if fresh and stamp is not None and stamp.get("image_id") and _engine_has(engine, recipe.ref, stamp):
        _say(f"base {recipe.ref} is up to date ({stamp['image_id'][:19]})")
        return _base_image(recipe, paths, stamp, built=False)
    engine.version()
    if not (fresh and stamp is not None and _tarball_intact(ctx, paths, stamp)):
        if tool_version is None:
            raise ToolMissing("mmdebstrap not found; install it with: apt-get install mmdebstrap")
        if not MERGED_USR_HOOKS.is_dir():
            raise ToolMissing(f"{MERGED_USR_HOOKS} not found: mmdebstrap {tool_version} has no merged-usr hooks "
                              "there (Debian 12's mmdebstrap has them); install or reinstall it with: "
                              "apt-get install --reinstall mmdebstrap")
        check_emulation(recipe.arch)
        stamp = build_base_tarball(ctx, recipe, paths, tool_version)
    assert stamp is not None
    stamp = import_base(ctx, recipe, paths, stamp)
    return _base_image(recipe, paths, stamp, built=True)


def build_base_tarball(ctx: Context, recipe: BaseRecipe, paths: BasePaths, tool_version: str) -> dict[str, Any]:
    """Run mmdebstrap into a temporary file; rename and stamp it only when all went well."""
    paths.stamp.unlink(missing_ok=True)
    tmp_tar = paths.tarball.with_name("rootfs.tar.tmp")
    tmp_pkgs = paths.packages.with_name("packages.txt.tmp")
    try:
        title = f"mmdebstrap {recipe.release}/{recipe.debian_arch} ({len(recipe.all_packages)} packages + deps)"
        with ctx.steps.step(title):
            run_streaming(mmdebstrap_argv(recipe, tmp_tar, tmp_pkgs), env=mmdebstrap_env(recipe, ctx.state))
        with ctx.steps.step("checking the tarball"):
            sha = sha256_file(tmp_tar)
            kernel = find_kernel_version(tmp_tar)
        tmp_pkgs.replace(paths.packages)
        tmp_tar.replace(paths.tarball)
    except CommandFailed as exc:
        raise BuildError(f"mmdebstrap failed: {exc}") from exc
    finally:
        tmp_tar.unlink(missing_ok=True)
        tmp_pkgs.unlink(missing_ok=True)
    size = paths.tarball.stat().st_size
    stamp: dict[str, Any] = {
        "inputs": recipe.inputs(),
        "mmdebstrap": tool_version,
        "tarball_sha256": sha,
        "tarball_size": size,
        "kernel": kernel,
    }
    write_stamp(paths.stamp, stamp)
    _say(f"rootfs.tar: {size / 1e6:.0f} MB, sha256 {sha[:16]}..., kernel {kernel}")
    return stamp


def mmdebstrap_argv(recipe: BaseRecipe, out: Path, packages_out: Path) -> list[str]:
    list_packages = "chroot \"$1\" dpkg-query -W -f='${Package}\\t${Version}\\n' > " + shlex.quote(str(packages_out))
    return [
        "mmdebstrap",
        "--variant=apt",
        f"--architectures={recipe.debian_arch}",
        "--format=tar",
        f"--include={','.join(recipe.all_packages)}",
        *(f"--dpkgopt={opt}" for opt in recipe.dpkg_excludes),
        f"--hook-dir={MERGED_USR_HOOKS}",
        *(f"--customize-hook={hook}" for hook in CUSTOMIZE_HOOKS),
        f"--customize-hook={list_packages}",
        recipe.release,
        str(out),
        *recipe.sources(),
    ]


def mmdebstrap_env(recipe: BaseRecipe, state: StateDir) -> dict[str, str]:
    return {
        "SOURCE_DATE_EPOCH": str(recipe.epoch),
        "TMPDIR": str(state.tmp_dir),  # the unpacked rootfs lives here while it is built
        "INITRD": "No",  # no initramfs in the base: every class builds its own
        "LC_ALL": "C.UTF-8",
    }


def import_base(ctx: Context, recipe: BaseRecipe, paths: BasePaths, stamp: dict[str, Any]) -> dict[str, Any]:
    engine = ctx.engine
    """Wrap the tarball as a one-layer image with a config written here, and load it."""
    config = finalize_image_config(recipe, stamp)
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    try:
        with ctx.steps.step(f"loading {recipe.ref} into {engine.name}"):
            write_docker_archive(paths.archive, recipe.ref, config_bytes, paths.tarball, recipe.epoch)
            engine.load(paths.archive)
    finally:
        paths.archive.unlink(missing_ok=True)
    loaded = engine.inspect(recipe.ref)["id"]
    if loaded != image_id:
        raise BuildError(f"{engine.name} loaded {recipe.ref} as {loaded}, expected {image_id}")
    stamp = {**stamp, "image_id": image_id, "ref": recipe.ref}
    write_stamp(paths.stamp, stamp)
    _say(f"base {recipe.ref} is {image_id[:19]}")
    return stamp


def finalize_image_config(recipe: BaseRecipe, stamp: dict[str, Any]) -> dict[str, Any]:
    created = datetime.fromtimestamp(recipe.epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = {
        "org.opencontainers.image.title": f"Kiln offline base: Debian {recipe.release}",
        "org.opencontainers.image.created": created,
        "dev.kiln.base.release": recipe.release,
        "dev.kiln.base.arch": recipe.arch.value,
        "dev.kiln.base.kernel": stamp["kernel"],
    }
    return {
        "architecture": recipe.debian_arch,
        "os": "linux",
        "created": created,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/bash"],
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{stamp['tarball_sha256']}"]},
        "history": [
            {
                "created": created,
                "created_by": f"kiln base: mmdebstrap --variant=apt {recipe.release} + {' '.join(recipe.all_packages)}",
            }
        ],
    }


def write_docker_archive(out: Path, ref: str, config: bytes, layer: Path, epoch: int) -> None:
    """A `docker save`-format tar that both `podman load` and the Docker API load."""
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = f"{hashlib.sha256(config).hexdigest()[:16]}/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": [layer_name]}])
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((config_name, config), ("manifest.json", manifest.encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), epoch, 0o644
            tar.addfile(info, io.BytesIO(data))
        info = tar.gettarinfo(str(layer), arcname=layer_name)
        info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
        with layer.open("rb") as f:
            tar.addfile(info, f)


def find_kernel_version(tarball: Path) -> str:
    """The one kernel under /usr/lib/modules in the rootfs tarball."""
    versions = set()
    with tarfile.open(tarball, "r:") as tar:
        for member in tar:
            parts = member.name.lstrip("./").split("/")
            if parts[:3] == ["usr", "lib", "modules"] and len(parts) >= 4 and parts[3]:
                versions.add(parts[3])
    if len(versions) != 1:
        raise BuildError(f"expected one kernel in the base, found {sorted(versions) or 'none'}")
    return versions.pop()


def finalize_mmdebstrap_version() -> str | None:
    """`1.3.5`, or None when mmdebstrap is not installed."""
    try:
        out = run(["mmdebstrap", "--version"], capture=True, quiet=True).stdout.decode()
    except ToolMissing:
        return None
    return out.split()[-1]


def read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_stamp(path: Path, stamp: dict[str, Any]) -> None:
    write_json_atomic(path, stamp)


def _stamp_matches(stamp: dict[str, Any], recipe: BaseRecipe, tool_version: str | None) -> bool:
    """Same inputs and tool version; without mmdebstrap, an existing base is still usable."""
    if stamp.get("inputs") != recipe.inputs():
        return False
    return tool_version is None or stamp.get("mmdebstrap") == tool_version


def _engine_has(engine: Engine, ref: str, stamp: dict[str, Any]) -> bool:
    return engine.exists(ref) and engine.inspect(ref)["id"] == stamp["image_id"]


def _tarball_intact(ctx: Context, paths: BasePaths, stamp: dict[str, Any]) -> bool:
    if not paths.tarball.exists() or not paths.packages.exists():
        return False
    with ctx.steps.step("verifying the cached rootfs.tar"):
        return sha256_file(paths.tarball) == stamp.get("tarball_sha256")


def _base_image(recipe: BaseRecipe, paths: BasePaths, stamp: dict[str, Any], built: bool) -> BaseImage:
    return BaseImage(
        ref=recipe.ref,
        image_id=stamp["image_id"],
        tarball=paths.tarball,
        tarball_sha256=stamp["tarball_sha256"],
        kernel=stamp["kernel"],
        packages=paths.packages,
        built=built,
    )


def _say(message: str) -> None:
    if VERBOSE:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
