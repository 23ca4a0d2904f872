"""Small, fast stand-ins for OTA tests: tiny Kiln-shaped OCI images, signed releases, a fake device.

    layout_digest = make_oci_image(tmp / "oci", "1.1.0", release_files(version="1.1.0"),
                                   release_labels(version="1.1.0"))
    digest = publish(registry, "kiln/tiny", tmp / "oci", "1.1.0", key=key, lookaside=sigs,
                     cls="tiny", tags=["1.1.0", "stable"], state=state)
    device = FakeDevice.create(tmp / "dev", registry=..., lookaside=url, key=key, cls="tiny")
    device.agent("update", "--no-reboot")

A FakeDevice is a directory standing in for a device: its ESP, /var/lib/kiln, two slot
image FILES in place of the root partitions, /proc/cmdline and the boot id. The agent
runs for real against it through KILN_AGENT_ROOT: a subprocess, as its unit runs it
(`python -I /usr/lib/kiln/launch.py kiln-agent`), from the launcher and the kiln_device
package copied into the fake device's /usr/lib/kiln.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.run import run
from builder.core.state import StateDir, make_state_dir
from builder.image.render import make_device_package
from builder.keys.device_files import render_policy
from builder.keys.release_key import SigningKey, make_signing_key
from builder.release.publish import promote
from builder.release.registry import running_registry, serving_lookaside
from builder.release.signing import Access, make_signature, make_verifier
from kiln_device import contract
from tests.conftest import ROOT, require_tool

LAUNCHER = ROOT / "overlays/common" / contract.LAUNCHER.lstrip("/")
KVER = "6.1.0-test-amd64"
SLOT_SIZE = 4 * 1024 * 1024


def release_files(*, cls: str = "tiny", compatible: str = "kiln,tiny", version: str = "1.0.0",
                  min_version: str | None = None, kernel: bytes | None = None, compression: str = "lz4",
                  extra: Mapping[str, bytes] | None = None, development: bool | None = None,
                  kernel_args: Any = ("console=ttyS0,115200n8", "panic=10")) -> dict[str, bytes]:
    """The files of a Kiln image that the agent reads, and little else."""
    release = {"class": cls, "compatible": compatible, "version": version, "minVersion": min_version,
               "channel": "stable", "bootTries": 3, "bootControl": "systemd-boot", "rootCompression": compression,
               "kernelArgs": list(kernel_args) if isinstance(kernel_args, tuple) else kernel_args}
    if development is not None:
        release["development"] = development
    files = {  # release.json says all the agent needs: no class.json, no kargs.d
        contract.RELEASE_JSON.lstrip("/"): json.dumps(release).encode(),
        f"usr/lib/modules/{KVER}/vmlinuz": kernel or f"kernel of {version}\n".encode(),
        f"usr/lib/modules/{KVER}/initramfs.img": f"initramfs of {version}\n".encode(),
        "usr/share/kiln/payload.bin": hashlib.sha256(version.encode()).digest() * 2048,  # 64 KiB
        "etc/os-release": b"ID=debian\n",
    }
    files.update(extra or {})
    return files


def release_labels(*, compatible: str = "kiln,tiny", version: str = "1.0.0", cls: str = "tiny",
                   min_version: str | None = None, development: bool | None = None,
                   layers: str | None = None) -> dict[str, str]:
    """An image's labels; `layers` (a compression) makes it one that boots from layers."""
    labels = {contract.LABEL_VERSION: version, contract.LABEL_COMPATIBLE: compatible,
              contract.LABEL_CLASS: cls, contract.LABEL_MIN_VERSION: min_version or ""}
    if layers is not None:
        labels[contract.LABEL_ROOT_LAYERS] = layers
    if development is not None:
        labels[contract.LABEL_DEVELOPMENT] = "true" if development else "false"
    return labels


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


@dataclass(frozen=True)
class Symlink:
    """A symbolic link in an image layer (a value in make_oci_image's `files`)."""

    target: str


def _layer(files: Mapping[str, bytes | Symlink]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name, data in sorted(files.items()):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            if isinstance(data, Symlink):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, data.target, 0o777
                tar.addfile(info)
                continue
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_oci_image(layout: Path, ref: str, files: Mapping[str, bytes | Symlink], labels: Mapping[str, str],
                   base: Mapping[str, bytes | Symlink] | None = None,
                   top: Mapping[str, bytes | Symlink] | None = None) -> str:
    """An OCI image (one base layer when `base` is given, then one layer of `files`, then one of `top`
    when given: a verified image's boot layer) in an OCI layout under the name `ref`; returns the
    manifest digest. Deterministic."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    raws = [_layer(base)] if base else []
    raws.append(_layer(files))
    if top:
        raws.append(_layer(top))
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, gzip.compress(r, mtime=0))}
              for r in raws]
    config = {"architecture": "amd64", "os": "linux", "config": {"Labels": dict(labels)},
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(r).hexdigest()}" for r in raws]}}
    cfg = _blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg}, "layers": layers}
    man = _blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index_path = layout / "index.json"
    empty = {"schemaVersion": 2, "manifests": []}
    index: dict[str, Any] = json.loads(index_path.read_text()) if index_path.exists() else empty
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != ref]
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **man,
                               "annotations": {"org.opencontainers.image.ref.name": ref}})
    index_path.write_text(json.dumps(index))
    return str(man["digest"])


def push_unsigned(registry: str, repo: str, layout: Path, ref: str, tag: str, state: StateDir) -> str:
    """skopeo copy an OCI layout image to registry/repo:tag (plain http); returns its digest."""
    digestfile = state.tmp_dir / f"digest-{os.getpid()}"
    run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--digestfile", digestfile,
         f"oci:{layout}:{ref}", f"docker://{registry}/{repo}:{tag}"], env=state.engine_env(), capture=True)
    return digestfile.read_text().strip()


def publish(registry: str, repo: str, layout: Path, ref: str, *, key: SigningKey, lookaside: Path, cls: str,
            tags: Sequence[str], state: StateDir) -> str:
    """Release an OCI layout image the way `kiln release` does: staging tag, sign, promote."""
    digest = push_unsigned(registry, repo, layout, ref, f"staging-{ref}", state)
    make_signature(f"{registry}/{repo}", digest, ref, cls=cls, key=key, lookaside_dir=lookaside,
                   access=Access(tls_verify=False), state=state)
    verifier = make_verifier(state, cls, key, lookaside, registry)
    for tag in tags:
        promote(f"{registry}/{repo}", digest, tag, verifier, access=Access(tls_verify=False), state=state)
    return digest


AGENT_TOOLS = ("skopeo", "umoci", "mkfs.erofs", "gpg", "docker-registry")


@dataclass
class Services:
    """What the agent tests publish to and update from: a registry and a signature lookaside on
    127.0.0.1, the release key, and the state directory `publish` uses."""
    registry: str
    registry_log: Path
    lookaside: Path
    lookaside_url: str
    key: SigningKey
    state: StateDir


@contextmanager
def ota_services(tmp: Path, tools: Sequence[str] = AGENT_TOOLS) -> Iterator[Services]:
    """Start them under `tmp` (the key in tmp/key, signatures in tmp/signatures); stopped on exit."""
    for tool in tools:
        require_tool(tool)
    key = make_signing_key(tmp / "key")
    state = make_state_dir(root=tmp / "state")
    lookaside = tmp / "signatures"
    lookaside.mkdir()
    with running_registry(tmp / "registry") as reg, serving_lookaside(lookaside) as url:
        yield Services(reg.address, reg.root / "registry.log", lookaside, url, key, state)


@dataclass(frozen=True)
class FakeDevice:
    root: Path

    @property
    def esp(self) -> Path:
        return self.root / "efi"

    @property
    def entries(self) -> Path:
        return self.esp / "loader" / "entries"

    def slot(self, name: str) -> Path:
        return self.root / "dev" / f"root-{name}.img"

    @property
    def layers(self) -> Path:
        """The layer store (the data partition's layers/)."""
        return self.root / "run/kiln/data/layers"

    @property
    def state_file(self) -> Path:
        return self.root / "var/lib/kiln/agent/state.json"

    @classmethod
    def create(cls, root: Path, *, registry: str, lookaside: str, key: SigningKey, klass: str = "tiny",
               compatible: str = "kiln,tiny", version: str = "1.0.0", booted: str = "a",
               trust_root: bytes | None = None, channel: str | None = None) -> FakeDevice:
        """A device of KLASS running VERSION from slot BOOTED; with TRUST_ROOT (a TUF root.json) its image
        trusts its channel through TUF, as images with a root do; CHANNEL: the one its image follows."""
        dev = cls(root)
        kiln = contract.under(root, contract.LIB_DIR)
        kiln.mkdir(parents=True)
        shutil.copyfile(LAUNCHER, contract.under(root, contract.LAUNCHER))
        make_device_package(contract.under(root, contract.PYTHON_DIR) / "kiln_device")
        (kiln / "release-key.asc").write_bytes(key.public_key.read_bytes())
        (kiln / "policy.json").write_text(render_policy(klass, kiln / "release-key.asc"))
        dev.set_release(version, compatible=compatible, cls=klass)
        config = {
            "registry": registry, "repository": f"kiln/{klass}", "lookaside": lookaside, "insecure": True,
            "policy": str(kiln / "policy.json"), "release": str(kiln / "release.json"),
            "stateDir": str(root / "var/lib/kiln/agent"), "ociDir": str(root / "var/lib/kiln/oci"),
            "workDir": str(root / "var/lib/kiln/work"), "layersDir": str(dev.layers), "esp": str(dev.esp),
            "slots": {"a": str(dev.slot("a")), "b": str(dev.slot("b"))},
            "partuuids": {"a": "11111111-1111-1111-1111-111111111111",
                          "b": "22222222-2222-2222-2222-222222222222"},
            "cmdline": str(root / "proc/cmdline"), "efivars": str(root / "efivars"),
            "bootId": str(root / "proc/boot_id"), "rebootCommand": ["true"],
            "trustRoot": str(contract.under(root, contract.TRUST_ROOT)), "trustDir": str(root / "var/lib/kiln/tuf"),
            # A fake device never makes its key in the build host's own TPM (a CI runner may have one).
            "fleet": {"identity": "file"},
        }
        if channel is not None:
            config["channel"] = channel
        if trust_root is not None:
            contract.under(root, contract.TRUST_ROOT).parent.mkdir(parents=True)
            contract.under(root, contract.TRUST_ROOT).write_bytes(trust_root)
        contract.under(root, contract.AGENT_JSON).write_text(json.dumps(config, indent=2))
        (root / "dev").mkdir()
        dev.slot("a").write_bytes(os.urandom(SLOT_SIZE))  # the running system: must never change
        dev.slot("b").write_bytes(b"\0" * SLOT_SIZE)
        dev.entries.mkdir(parents=True)
        (dev.entries / f"kiln-{version}-{booted}.conf").write_text(f"title old\nversion {version}\n")
        (root / "proc").mkdir()
        dev.boot(booted, f"kiln-{version}-{booted}.conf")
        return dev

    def set_release(self, version: str, *, compatible: str = "kiln,tiny", cls: str = "tiny") -> None:
        release = {"class": cls, "compatible": compatible, "version": version, "channel": "stable",
                   "bootTries": 3, "bootControl": "systemd-boot"}
        contract.under(self.root, contract.RELEASE_JSON).write_text(json.dumps(release))

    def boot(self, slot: str, entry: str, version: str | None = None) -> None:
        """Simulate a (re)boot into `slot` via `entry`: new boot id, cmdline, selected entry."""
        (self.root / "proc/cmdline").write_text(f"root=PARTUUID=x ro kiln.slot={slot} quiet\n")
        (self.root / "proc/boot_id").write_text(os.urandom(16).hex() + "\n")
        efivars = self.root / "efivars"
        efivars.mkdir(exist_ok=True)
        var = efivars / "LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
        var.write_bytes(b"\x06\0\0\0" + (entry + "\0").encode("utf-16-le"))
        if version:
            self.set_release(version)

    def agent_argv(self) -> list[str]:
        """kiln-agent as /usr/bin/kiln-agent runs it, from this device's copy of the package."""
        return [sys.executable, "-I", str(contract.under(self.root, contract.LAUNCHER)), "kiln-agent"]

    def agent(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "KILN_AGENT_ROOT": str(self.root), **(env or {})}
        return subprocess.run([*self.agent_argv(), *args], env=full_env, capture_output=True,
                              text=True, timeout=300, check=False)

    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_file.read_text()))

    def status(self) -> dict[str, Any]:
        proc = self.agent("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))
