"""The data partition's layer store in a factory disk: the image's layers, one erofs each, where
the device agent keeps them (kiln_device.layers), so that the first update builds only the
layers that changed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from builder.core.errors import DiskError
from kiln_device import contract
from kiln_device.errors import AgentError
from kiln_device.layers import Layer, fill_store, image_layers
from kiln_device.oci_layout import verified_labels

# Where the agent keeps images (its ociDir, /var/lib/kiln/oci) inside the data partition:
# the /var overlay's upper dir. Ref names are versions with anything but [A-Za-z0-9._-] as _.
OCI_SEED_DIR = "overlay/var/upper/" + contract.OCI_DIR.removeprefix("/var/")
# The layer store inside the data partition (the initramfs mounts the partition on contract.DATA_MOUNT).
LAYER_STORE_DIR = contract.LAYERS_DIR.removeprefix(contract.DATA_MOUNT + "/")


def make_layer_store(version: str, tree: Path, *, boot_layer: bool = False) -> list[Layer]:
    """The layers of the image seeded in `tree` (OCI_SEED_DIR) as the agent's layer store, when the
    image boots from layers (its label); made by the agent's own code. Needs root (whiteouts are
    device nodes, opaque directories trusted.* xattrs): without it the store stays empty and the
    first update builds every layer. fs-verity is turned on by the device (the agent, or the
    initramfs on the first boot from layers): the build host's kernel may not have it. Returns the
    layers the store holds, bottom first. `boot_layer`: the image's top layer is its boot layer
    (verified boot, builder.image.boot), which is not part of the root: it is left out, and the store
    is required (a verified slot boots from layers only)."""
    layout = tree / OCI_SEED_DIR
    ref = contract.oci_ref_name(version)
    try:
        compression = verified_labels(layout, ref).get(contract.LABEL_ROOT_LAYERS)
        if compression is None or compression not in contract.EROFS_COMPRESSORS:
            if boot_layer:
                raise DiskError(f"the image has a boot layer but no valid {contract.LABEL_ROOT_LAYERS} label")
            return []
        if os.geteuid() != 0:
            if boot_layer:
                raise DiskError("a disk for verified boot needs root: its slot boots from the layer store, made "
                                "here as the device makes it (whiteouts are device nodes)")
            print("warning: not running as root: the disk's layer store stays empty (the device's first "
                  "update builds every layer)", file=sys.stderr)
            return []
        wanted = image_layers(layout, ref)
        layers, _, _ = fill_store(tree / LAYER_STORE_DIR, wanted[:-1] if boot_layer else wanted,
                                  contract.EROFS_COMPRESSORS[compression], (3600.0, 3600.0))
    except AgentError as exc:
        raise DiskError(f"the data partition's layer store: {exc.message}") from None
    return layers
