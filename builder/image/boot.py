"""Verified boot at build time (`spec.secureBoot`): the image's root layers bound to signed UKIs.

After the engine has built the image, `make_boot_layer`:
1. copies it to a scratch OCI layout and makes each layer's erofs exactly as the device does
   (kiln_device.layers: same tar, same mkfs.erofs flags, fixed times and UUID), so it knows the
   fs-verity digest of every layer the device will boot;
2. writes the slot's layer list (/kiln-layers, what the agent and `kiln disk` write on a slot) and
   takes its sha256: the digest that binds the root;
3. builds one UKI per slot from the image's own stub, kernel and initramfs (builder.image.uki),
   whose command line carries `kiln.layers=<digest>`, and signs it and systemd-boot with the Secure
   Boot db key (builder.keys.secureboot);
4. adds them as one more layer, the boot layer, at /usr/lib/kiln/boot, with the labels
   `dev.kiln.boot=uki` and `dev.kiln.boot.layers=<digest>`.

The boot layer is not part of the booted root: a list cannot name the layer that carries its own
digest. The device's root is every layer below it, checked at boot against the signed digest
(overlays/initramfs .../kiln-overlay); the UKIs themselves are checked by the firmware.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.core.context import Context
from builder.core.errors import BuildError
from builder.core.run import run
from builder.image.uki import UkiParts, find_stub, make_uki
from builder.keys.secureboot import SecureBootKeys, sign_efi
from kiln_device import contract
from kiln_device.contract import EROFS_COMPRESSORS, RELEASE_JSON, SLOTS
from kiln_device.errors import AgentError
from kiln_device.kernel import find_kernels
from kiln_device.layers import Layer, fill_store, image_layers, manifest_text, mounted_stack
from kiln_device.tree import resolve_in_tree

LABEL_BOOT = contract.LABEL_BOOT  # "uki": the top layer is the boot layer
LABEL_BOOT_LAYERS = contract.LABEL_BOOT_LAYERS  # the layer list digest the UKIs bind
BOOT_KIND = contract.BOOT_UKI
CERTS_DIR = "secureboot"  # in BOOT_DIR: the PK, KEK and db certificates (public), for the VM's firmware
BOOT_GROUP = "boot"  # the build record's group of the boot layer
SYSTEMD_BOOT = {"x86_64": "systemd-bootx64.efi", "aarch64": "systemd-bootaa64.efi"}
SYSTEMD_BOOT_DIR = "usr/lib/systemd/boot/efi"


@dataclass(frozen=True)
class BootLayer:
    image_id: str
    layers: tuple[Layer, ...]
    digest: str
    ukis: dict[str, str]  # slot -> sha256 of the signed UKI
    uki_size: int


def finalize_osrel(os_release: str, *, cls: str, version: str) -> str:
    """The UKI's .osrel: the image's os-release with the class and release version (systemd-boot's title
    and sort order come from it)."""
    lines = [line for line in os_release.splitlines()
             if not line.startswith(("IMAGE_ID=", "IMAGE_VERSION=", "PRETTY_NAME="))]
    return "\n".join([*lines, f'PRETTY_NAME="Kiln {cls} {version}"', f"IMAGE_ID=kiln-{cls}",
                      f"IMAGE_VERSION={contract.entry_text(version)}"]) + "\n"


def finalize_boot_containerfile(base: str, digest: str) -> str:
    return (f"FROM {base}\n"
            f"COPY boot/ {contract.BOOT_DIR}/\n"
            f'LABEL {LABEL_BOOT}="{BOOT_KIND}" {LABEL_BOOT_LAYERS}="{digest}"\n')


def root_layers(layout: Path, ref: str, *, has_boot_layer: bool) -> list[tuple[str, Path]]:
    """The layers the device boots: all of them, less the boot layer on top when there is one."""
    layers = image_layers(layout, ref)
    return layers[:-1] if has_boot_layer else layers


def make_layer_erofs(layout: Path, ref: str, store: Path, compression: str) -> list[Layer]:
    """Each layer's erofs in `store` (reused when there), made with the device's own code. Needs root."""
    if os.geteuid() != 0:
        raise BuildError("verified boot (spec.secureBoot) needs root at build time: the layers' erofs are made as "
                         "the device makes them (whiteouts are device nodes, opaque directories trusted.* xattrs)")
    try:
        layers, _, _ = fill_store(store, image_layers(layout, ref), EROFS_COMPRESSORS[compression], (3600.0, 3600.0))
    except AgentError as exc:
        raise BuildError(f"making the layers' erofs: {exc.message}") from None
    return layers


def export_layout(ctx: Context, image_id: str, layout: Path, name: str) -> None:
    """The built image as an OCI layout: from podman's store, or from the Docker API's daemon (skopeo)."""
    base_url = getattr(ctx.engine, "base_url", None)
    if ctx.engine.name == "docker" and base_url:
        run(["skopeo", "copy", "--quiet", "--src-daemon-host", base_url, f"docker-daemon:{image_id}",
             f"oci:{layout}:{name}"], capture=True)
        return
    run(["podman", "push", "--quiet", image_id, f"oci:{layout}:{name}"], env=ctx.state.engine_env(), capture=True)


def make_boot_layer(ctx: Context, *, cls: str, version: str, ref: str, image_id: str, architecture: str,
                    compression: str, keys: SecureBootKeys, passphrase: str | None, epoch: int,
                    workdir: Path) -> BootLayer:
    """Build the boot layer on top of `image_id` and tag the result as `ref`; see the module doc."""
    state = ctx.state
    if compression not in EROFS_COMPRESSORS:
        raise BuildError(f"verified boot needs a root made of layers; the image's compression is {compression!r}")
    store = state.layer_erofs_dir / compression  # the same layer, the same erofs: kept for the next build
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    layout = workdir / "layout"
    name = contract.oci_ref_name(version)
    export_layout(ctx, image_id, layout, name)
    layers = make_layer_erofs(layout, name, store, compression)
    text = manifest_text(layers)
    digest = contract.layers_digest(text)
    boot = workdir / "context" / "boot"
    boot.mkdir(parents=True)
    (workdir / "context" / "boot" / "layers").write_text(text)  # for a reader; the UKI's digest is what counts
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(mounted_stack(store, layers, workdir / "mnt"))
        kernels = find_kernels(root)
        if not kernels:
            raise BuildError(f"the image has no {contract.MODULES_DIR}/<kver>/vmlinuz + initramfs.img to boot")
        kernel = kernels[-1]
        release = contract.parse_release(json.loads(resolve_in_tree(root, RELEASE_JSON).read_text()), RELEASE_JSON)
        os_release = resolve_in_tree(root, "usr/lib/os-release").read_text()
        stub = find_stub(root, architecture)
        loader_name = SYSTEMD_BOOT.get(architecture, "")
        loader = next((p for p in (root / SYSTEMD_BOOT_DIR / loader_name, Path("/") / SYSTEMD_BOOT_DIR / loader_name)
                       if p.is_file()), None)
        if loader is None:
            raise BuildError(f"systemd-boot ({SYSTEMD_BOOT_DIR}/{loader_name}) is neither in the image nor here",
                             hint="apt-get install systemd-boot-efi")
        osrel = finalize_osrel(os_release, cls=cls, version=version)
        ukis: dict[str, str] = {}
        for slot in SLOTS:
            cmdline = contract.render_uki_cmdline(slot=slot, layers=digest, kargs=release.kernel_args or ())
            out = boot / contract.uki_image_name(slot)
            make_uki(stub, UkiParts(kernel=kernel.vmlinuz, initrd=kernel.initrd, cmdline=cmdline, osrel=osrel,
                                    uname=kernel.version), out)
            sign_efi(keys, out, passphrase, epoch=epoch)
            ukis[slot] = hashlib.sha256(out.read_bytes()).hexdigest()
        sign_efi(keys, loader, passphrase, out=boot / loader_name, epoch=epoch)
    certs = boot / CERTS_DIR
    certs.mkdir()
    for role in ("PK", "KEK", "db"):
        shutil.copyfile(keys.cert(role), certs / f"{role}.crt")
    (certs / "owner-guid").write_text(keys.owner + "\n")
    for p in [boot.parent, *boot.parent.rglob("*")]:
        os.utime(p, (epoch, epoch), follow_symlinks=False)
    containerfile = workdir / "context" / "Containerfile"
    containerfile.write_text(finalize_boot_containerfile(ref, digest))
    new_id = ctx.engine.build(workdir / "context", containerfile, ref, {}, epoch)
    size = (boot / contract.uki_image_name("a")).stat().st_size
    shutil.rmtree(workdir / "layout", ignore_errors=True)
    return BootLayer(new_id, tuple(layers), digest, ukis, size)
