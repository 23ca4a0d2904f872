"""Kiln's state directory: private container storage, its configs, the base cache.

Layout (default `<project>/.kiln/`, override with `KILN_STATE_DIR`):

    containers/containers.conf   Kiln's own engine config (runtime runc, ulimits)
    containers/storage.conf      points podman at the private store below
    containers/storage/          graphroot: images and layers built by Kiln
    base/<name>/                 offline base tarballs and their stamps
    tmp/                         scratch space (mmdebstrap, image copies)
    cache/model-wheels/          wheels that fetched models come from

Kiln never edits the host's global container config. Every podman call gets
`engine_env()`, which points `CONTAINERS_CONF` and `CONTAINERS_STORAGE_CONF` at
the files above, so a test with its own state dir cannot touch the CLI's
images, `rm -rf .kiln` resets everything, and "disk full in the state dir"
means what it says. To look at Kiln's images by hand:

    CONTAINERS_CONF=.kiln/containers/containers.conf \
    CONTAINERS_STORAGE_CONF=.kiln/containers/storage.conf podman images
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.core.files import write_if_changed

STATE_ENV = "KILN_STATE_DIR"
DEFAULT_STATE_NAME = ".kiln"

# crun fails on this kind of host ("cgroups in hybrid mode not supported"); runc
# works on cgroups v1, hybrid and v2. The ulimits keep `podman run` from
# inheriting a tiny or huge host limit (measured: see docs/build-notes.md).
RUNTIME = "runc"
DEFAULT_ULIMITS = ("nofile=20000:20000", "nproc=32768:32768")


@dataclass(frozen=True)
class StateDir:
    """Paths under one state directory. Pure: nothing is created until `make_state_dir`."""

    root: Path

    @property
    def containers_dir(self) -> Path:
        return self.root / "containers"

    @property
    def containers_conf(self) -> Path:
        return self.containers_dir / "containers.conf"

    @property
    def storage_conf(self) -> Path:
        return self.containers_dir / "storage.conf"

    @property
    def graphroot(self) -> Path:
        return self.containers_dir / "storage"

    @property
    def runroot(self) -> Path:
        """Runtime state of the store: on /run (cleared at boot), unique per graphroot."""
        key = hashlib.sha256(os.fsencode(self.graphroot)).hexdigest()[:12]
        return finalize_runtime_base() / key

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def registry_dir(self) -> Path:
        """`kiln registry`'s data, certificates and pid file."""
        return self.root / "registry"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def model_wheels_dir(self) -> Path:
        """Wheels that fetched models come from (builder.model.fetch), by their sha256."""
        return self.root / "cache" / "model-wheels"

    @property
    def layer_erofs_dir(self) -> Path:
        """Each image layer's erofs as a device makes it (builder.image.boot), by diff id: a verified
        boot build measures only the layers it has not seen."""
        return self.root / "cache" / "layer-erofs"

    def engine_env(self) -> dict[str, str]:
        """Environment for every podman/buildah/skopeo call (and a podman service)."""
        return {
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
        }


def finalize_runtime_base() -> Path:
    """Where runtime state goes: /run for root, $XDG_RUNTIME_DIR or /tmp otherwise."""
    if os.geteuid() == 0:
        return Path("/run/kiln")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "kiln"
    return Path(tempfile.gettempdir()) / f"kiln-{os.geteuid()}"


def finalize_state_root(project_root: Path | None = None) -> Path:
    """`$KILN_STATE_DIR` if set, else `<project_root or cwd>/.kiln`, made absolute."""
    override = os.environ.get(STATE_ENV)
    if override:
        return Path(override).expanduser().absolute()
    return ((project_root or Path.cwd()) / DEFAULT_STATE_NAME).absolute()


def render_containers_conf(state: StateDir) -> str:
    ulimits = ", ".join(f'"{u}"' for u in DEFAULT_ULIMITS)
    run = state.runroot
    return (
        "# Written by Kiln; used through CONTAINERS_CONF. Edits are overwritten.\n"
        "[containers]\n"
        f"default_ulimits = [{ulimits}]\n"
        "\n"
        "[engine]\n"
        f'runtime = "{RUNTIME}"\n'
        # Separate from the host's /run/libpod so reboot detection and locks are ours.
        f'tmp_dir = "{run / "libpod"}"\n'
        f'image_copy_tmp_dir = "{state.tmp_dir}"\n'
        'events_logger = "file"\n'
        'compression_format = "gzip"\n'  # what devices read (kiln_device.layers); podman push pins it too
    )


def render_storage_conf(state: StateDir) -> str:
    return (
        "# Written by Kiln; used through CONTAINERS_STORAGE_CONF. Edits are overwritten.\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{state.graphroot}"\n'
        f'runroot = "{state.runroot / "storage"}"\n'
    )


def make_state_dir(project_root: Path | None = None, root: Path | None = None) -> StateDir:
    """Create the state directory and (re)write Kiln's container configs; idempotent."""
    state = StateDir(root.absolute() if root else finalize_state_root(project_root))
    for path in (state.containers_dir, state.graphroot, state.base_dir, state.tmp_dir):
        path.mkdir(parents=True, exist_ok=True)
    write_if_changed(state.containers_conf, render_containers_conf(state))
    write_if_changed(state.storage_conf, render_storage_conf(state))
    return state
