"""The offline base: real mmdebstrap + real podman (container tier), plus fast checks.

The session fixture builds the base once into a persistent test state dir
(`.kiln/test-state`, or `$KILN_TEST_STATE_DIR`), separate from the CLI's, so a
second run is a cache hit and destructive tests never touch the CLI's images.
"""

from __future__ import annotations

import os
import tarfile
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.base import bootstrap as base_mod
from builder.base.bootstrap import (
    BaseImage,
    finalize_mirrors,
    make_base,
    make_base_for_class,
    mmdebstrap_argv,
    read_stamp,
)
from builder.base.mirrors import BaseMirror
from builder.core.context import Context, make_context
from builder.core.engine import PodmanEngine
from builder.core.errors import BuildError, ToolMissing
from builder.core.run import run
from builder.core.state import StateDir, make_state_dir
from builder.spec import names
from builder.spec.loader import load_class
from tests.conftest import ROOT, require_tool
from tests.images import QEMU_BASE_MODULES


def state_context(state: StateDir) -> Context:
    return make_context(PodmanEngine(state), state=state)


@pytest.fixture(scope="session")
def rootfs_members(base_image: BaseImage) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(base_image.tarball) as tar:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tar}


# --- fast checks: marked unit, so they run in the default tier --------------


@pytest.mark.unit
def test_the_base_made_for_a_class_is_the_one_it_builds_from() -> None:
    hc = load_class("qemu-x86_64", ROOT / "images")
    base = hc.spec.base
    recipe = base_mod.BaseRecipe(release=base.release or "", arch=hc.spec.architecture, mirror="m",
                                 security_mirror=None, components=("main",), snapshot=base.snapshot,
                                 packages=(), epoch=0, drop_modules=tuple(hc.spec.kernel.drop_modules))
    modules = names.finalize_modules_id(tuple(hc.spec.kernel.drop_modules))
    assert recipe.ref == names.base_ref(hc) == f"localhost/kiln/base/debian:bookworm-modules-{modules}"


@pytest.mark.unit
def test_classes_without_a_debian_bootstrap_base_are_refused(tmp_path: Path) -> None:
    hc = load_class("jetson-vision-standard", ROOT / "images")
    with pytest.raises(BuildError, match="Kiln bootstraps Debian bases only; this class needs a l4t bootstrap base"):
        make_base_for_class(state_context(make_state_dir(root=tmp_path)), hc)


@pytest.mark.unit
def test_mirrors() -> None:
    assert finalize_mirrors(None, None) == ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")
    assert finalize_mirrors("http://mirror.example/ubuntu/", None) == ("http://mirror.example/ubuntu", None)
    main, security = finalize_mirrors(None, "20250520T000000Z")
    assert main.endswith("/debian/20250520T000000Z")
    assert security is not None and security.endswith("/debian-security/20250520T000000Z")


@pytest.mark.unit
def test_mmdebstrap_argv_is_minimal_and_reproducible(tmp_path: Path) -> None:
    recipe = base_mod.BaseRecipe(
        release="bookworm",
        arch=base_mod.Architecture.x86_64,
        mirror="http://deb.debian.org/debian",
        security_mirror=None,
        components=("main",),
        snapshot=None,
        packages=base_mod.BASE_PACKAGES,
        epoch=1,
    )
    argv = mmdebstrap_argv(recipe, tmp_path / "out.tar", tmp_path / "pkgs")
    assert "--variant=apt" in argv
    assert "--include=" + ",".join(recipe.all_packages) in argv
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in argv
    # usr-is-merged in the essential phase, or init-system-helpers takes usrmerge and perl
    assert "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr" in argv
    assert argv[-1] == "deb http://deb.debian.org/debian bookworm-updates main"
    env = base_mod.mmdebstrap_env(recipe, make_state_dir(root=tmp_path / "state"))
    assert env["SOURCE_DATE_EPOCH"] == "1"
    assert env["INITRD"] == "No"


@pytest.mark.unit
def test_dropped_modules_are_dpkg_excludes_and_part_of_the_cache_key(tmp_path: Path) -> None:
    def recipe(drop: tuple[str, ...]) -> base_mod.BaseRecipe:
        return base_mod.BaseRecipe(release="bookworm", arch=base_mod.Architecture.x86_64, mirror="m",
                                   security_mirror=None, components=("main",), snapshot=None, packages=(),
                                   epoch=1, drop_modules=drop)

    trimmed, full = recipe(("sound", "drivers/gpu")), recipe(())
    argv = mmdebstrap_argv(trimmed, tmp_path / "out.tar", tmp_path / "pkgs")
    for root in ("/lib", "/usr/lib"):  # bookworm's kernel ships /lib/modules (merged /usr makes it /usr/lib)
        assert f"--dpkgopt=path-exclude={root}/modules/*/kernel/sound/*" in argv
        assert f"--dpkgopt=path-exclude={root}/modules/*/kernel/drivers/gpu/*" in argv
    assert not [a for a in mmdebstrap_argv(full, tmp_path / "o", tmp_path / "p")
                if a.startswith("--dpkgopt=") and "/modules/" in a]
    assert trimmed.inputs() != full.inputs() and trimmed.name != full.name and trimmed.ref != full.ref
    assert trimmed.name == f"debian-bookworm-modules-{names.finalize_modules_id(('sound', 'drivers/gpu'))}-x86_64"


@pytest.mark.unit
def test_a_class_base_is_made_with_its_module_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make_base_for_class hands the class's dropModules to make_base (the name it builds FROM has them)."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(base_mod, "make_base", lambda *args, **kwargs: seen.update(kwargs))
    hc = load_class("qemu-x86_64", ROOT / "images")
    where = BaseMirror(url="http://deb.debian.org/debian", snapshot=None, fallback=False, ref=names.base_ref(hc))
    make_base_for_class(state_context(make_state_dir(root=tmp_path)), hc, where)
    assert seen["drop_modules"] == hc.spec.kernel.drop_modules == QEMU_BASE_MODULES and QEMU_BASE_MODULES
    assert seen["force"] is False
    # the same set in another order is the same base, to the byte of its dpkg configuration
    one, other = (base_mod.BaseRecipe(release="bookworm", arch=base_mod.Architecture.x86_64, mirror="m",
                                      security_mirror=None, components=("main",), snapshot=None, packages=(),
                                      epoch=1, drop_modules=drop)
                  for drop in (("sound", "drivers/gpu/"), ("drivers/gpu", "sound")))
    assert one.inputs() == other.inputs() and one.ref == other.ref and one.dpkg_excludes == other.dpkg_excludes


@pytest.mark.unit
def test_base_class_force_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kiln base --class CLASS --force` asks for a rebuild (it used to drop --force and answer from the cache)."""
    from click.testing import CliRunner

    from builder.cli import main

    seen: dict[str, object] = {}

    def fake_make_base(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return types.SimpleNamespace(ref="r", image_id="i", kernel="k", built=True, tarball="t")

    monkeypatch.setattr(base_mod, "make_base", fake_make_base)
    monkeypatch.setattr(base_mod, "finalize_base_mirror", lambda hc: BaseMirror(
        url="http://deb.debian.org/debian", snapshot=None, fallback=False, ref=names.base_ref(hc)))
    monkeypatch.setenv("KILN_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["base", "--class", "qemu-x86_64", "--force"])
    assert result.exit_code == 0, result.output
    assert seen["force"] is True and seen["drop_modules"] == QEMU_BASE_MODULES


@pytest.mark.unit
def test_unknown_arch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no Debian base for architecture 'riscv64'"):
        make_base(state_context(make_state_dir(root=tmp_path)), arch="riscv64")


# --- real mmdebstrap + podman -----------------------------------------------


@pytest.mark.container
def test_base_is_loaded_under_its_stable_name(base_image: BaseImage, test_state: StateDir) -> None:
    engine = PodmanEngine(test_state)
    info = engine.inspect(base_image.ref)
    assert base_image.ref == names.base_ref(load_class("qemu-x86_64", ROOT / "images"))
    assert info["id"] == base_image.image_id
    assert [layer["diff_id"] for layer in info["layers"]] == [f"sha256:{base_image.tarball_sha256}"]
    assert info["created"].startswith("2025-01-01T00:00:00")
    assert info["labels"]["dev.kiln.base.kernel"] == base_image.kernel


@pytest.mark.container
def test_second_call_is_a_noop(base_image: BaseImage, test_state: StateDir) -> None:
    before = base_image.tarball.stat().st_mtime_ns
    again = make_base(state_context(test_state), drop_modules=QEMU_BASE_MODULES)
    assert again.built is False
    assert again.image_id == base_image.image_id
    assert base_image.tarball.stat().st_mtime_ns == before


@pytest.mark.container
def test_base_has_what_a_boot_needs_and_nothing_else(
    base_image: BaseImage, rootfs_members: dict[str, tarfile.TarInfo]
) -> None:
    rootfs_names = set(rootfs_members)
    files = {name for name, member in rootfs_members.items() if member.isfile()}
    kver = base_image.kernel
    # The kernel is where the image keeps it (once: never again in /boot); no debugging symbols.
    assert f"usr/lib/modules/{kver}/vmlinuz" in rootfs_names
    assert not [n for n in rootfs_names if n.startswith(("boot/vmlinuz", "boot/System.map"))]
    assert f"usr/lib/modules/{kver}/modules.dep" in rootfs_names
    assert "usr/lib/systemd/systemd" in rootfs_names
    assert "usr/sbin/init" in rootfs_names  # systemd-sysv (merged /usr)
    assert "usr/sbin/update-initramfs" in rootfs_names
    assert "usr/bin/bootctl" in rootfs_names
    # Every class builds its own initramfs (with Kiln's overlay hook).
    assert not any(n.startswith("boot/initrd.img") for n in rootfs_names)
    # Docs, man pages and locales are excluded (dpkg's doc symlinks stay); licences are kept.
    assert not [n for n in files if n.startswith("usr/share/man/")]
    assert not [n for n in files if n.startswith("usr/share/doc/") and not n.endswith("/copyright")]
    assert "usr/share/doc/systemd/copyright" in files
    assert not [n for n in files if n.startswith("usr/share/locale/") and not n.endswith("/locale.alias")]
    # Nothing host- or run-specific.
    for name in ("etc/resolv.conf", "etc/hostname", "var/cache/ldconfig/aux-cache", "var/log/dpkg.log"):
        assert name not in rootfs_names
    with tarfile.open(base_image.tarball) as tar:
        machine_id = tar.extractfile("./etc/machine-id")
        assert machine_id is not None and machine_id.read() == b""
        # _apt's, whatever the permissions of the state dir's parents were.
        assert tar.getmember("./var/lib/apt/lists/partial").uid != 0
    # The kernel modules qemu-x86_64 drops are not there; what every boot needs is.
    modules = f"usr/lib/modules/{kver}/kernel"
    for dropped in QEMU_BASE_MODULES:
        assert not [n for n in files if n.startswith(f"{modules}/{dropped}/")], dropped
    for needed in ("fs/erofs/erofs.ko", "fs/overlayfs/overlay.ko", "fs/ext4/ext4.ko", "drivers/block/virtio_blk.ko",
                   "drivers/net/virtio_net.ko", "drivers/watchdog/iTCO_wdt.ko"):
        assert f"{modules}/{needed}" in files, needed
    with tarfile.open(base_image.tarball) as tar:  # the kernel's own depmod ran without them
        dep = tar.extractfile(f"./usr/lib/modules/{kver}/modules.dep")
        assert dep is not None
        deps = dep.read().decode()
    assert "kernel/fs/erofs/erofs.ko:" in deps and "kernel/sound/" not in deps and "kernel/drivers/gpu/" not in deps
    packages = base_image.packages.read_text().splitlines()
    assert any(line.startswith("systemd\t") for line in packages)
    assert len(packages) < 200, "the base should stay minimal"


@pytest.mark.container
def test_base_runs_under_kilns_containers_conf(base_image: BaseImage, test_state: StateDir) -> None:
    out = run(
        ["podman", "run", "--rm", base_image.ref, "sh", "-c", "ulimit -n; systemctl --version | head -1"],
        env=test_state.engine_env(),
        capture=True,
    ).stdout.decode()
    assert out.splitlines()[0] == "20000"
    assert out.splitlines()[1].startswith("systemd 252")


@pytest.mark.container
def test_tarball_and_image_id_are_identical_on_a_second_build(
    base_image: BaseImage, test_state: StateDir, scratch_state: StateDir
) -> None:
    """Two cold builds (the second into another store) give the same bytes and image id.

    Both run in this session: a cached base may predate a mirror update.
    """
    first = base_image if base_image.built else make_base(state_context(test_state), force=True,
                                                          drop_modules=QEMU_BASE_MODULES)
    second = make_base(state_context(scratch_state), drop_modules=QEMU_BASE_MODULES)
    assert second.built is True
    assert second.tarball_sha256 == first.tarball_sha256
    assert second.image_id == first.image_id


@pytest.mark.container
def test_missing_image_is_reloaded_from_the_cached_tarball(base_image: BaseImage, scratch_state: StateDir) -> None:
    # Own store with the test state's tarball linked in: no mmdebstrap run, only a load.
    state = scratch_state
    cached = base_image.tarball.parent
    target = state.base_dir / cached.name
    target.mkdir(parents=True)
    for name in ("rootfs.tar", "packages.txt", "stamp.json"):
        os.link(cached / name, target / name)
    again = make_base(state_context(state), drop_modules=QEMU_BASE_MODULES)
    assert again.built is True
    assert again.image_id == base_image.image_id
    assert PodmanEngine(state).exists(base_image.ref)


@pytest.mark.container
def test_mmdebstrap_missing_fails_clearly(scratch_state: StateDir, path_only: Callable[..., None]) -> None:
    path_only("podman", "runc")
    with pytest.raises(ToolMissing, match=r"mmdebstrap not found; install it with: apt-get install mmdebstrap"):
        make_base(state_context(scratch_state), drop_modules=QEMU_BASE_MODULES)


@pytest.mark.container
def test_mmdebstrap_missing_but_base_cached_is_fine(
    base_image: BaseImage,
    test_state: StateDir,
    path_only: Callable[..., None],
) -> None:
    path_only("podman", "runc")
    assert make_base(state_context(test_state), drop_modules=QEMU_BASE_MODULES).built is False


@pytest.mark.container
def test_failed_bootstrap_leaves_nothing_to_trust(scratch_state: StateDir) -> None:
    require_tool("mmdebstrap")
    require_tool("podman")
    state = scratch_state
    with pytest.raises(BuildError, match="mmdebstrap failed"):
        make_base(state_context(state), mirror="http://127.0.0.1:9/debian")
    base_dir = state.base_dir / "debian-bookworm-x86_64"
    assert read_stamp(base_dir / "stamp.json") is None
    assert sorted(p.name for p in base_dir.iterdir()) == ["lock"]
    assert list(state.tmp_dir.iterdir()) == []
    assert not PodmanEngine(state).exists(names.offline_base_ref("bookworm", "x86_64"))
