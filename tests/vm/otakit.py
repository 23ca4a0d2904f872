"""What the OTA tests in QEMU share: releases to a registry on the host, the device's side of it
(configure, agent, status), and images derived from a built one for failure cases.

The registry and the signature server run on the host's loopback; the guest reaches them at
10.0.2.2 (QEMU user-mode networking). The release key is the one the image trusts (the
development class's per-checkout key, build/qemu-x86_64/dev-release-key).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.projects import project_dir
from builder.core.errors import VMError
from builder.core.run import run
from builder.core.state import StateDir
from builder.core.versions import DEFAULT_EPOCH
from builder.disk import vm
from builder.disk.rawdisk import partition_offset
from builder.image.boot import make_boot_layer
from builder.image.build import build_class
from builder.keys.release_key import SigningKey, resolve_signing_key
from builder.keys.secureboot import resolve_secureboot_keys
from builder.release.publish import push_signed
from builder.release.registry import RegistryInfo, running_registry
from builder.release.trust import Release as TufRelease
from builder.release.trust import open_repository, publish_release
from builder.spec.loader import load_class
from kiln_device import contract
from tests.conftest import ROOT
from tests.images import QEMU_CLASS, kiln_test_context, kiln_test_state
from tests.ota import publish

# The boot entries on a running device's ESP, both kinds: UKIs (verified boot) and .conf entries.
LIST_ENTRIES = "ls /efi/EFI/Linux /efi/loader/entries 2>/dev/null || true"
REPO = f"kiln/{QEMU_CLASS}"  # qemu-x86_64's; Releases.repo is the class's
GET_BLOB = re.compile(r'http\.request\.method=GET .*http\.request\.uri="/v2/[^"]*/blobs/(sha256:[0-9a-f]{64})"')


@dataclass
class Releases:
    registry: RegistryInfo
    key: SigningKey
    signatures: Path
    state: StateDir
    tmp: Path
    cls: str = QEMU_CLASS

    @property
    def repo(self) -> str:
        return f"kiln/{self.cls}"

    def guest_config(self, *, port: int | None = None, channel: str | None = None) -> dict[str, Any]:
        """/etc/kiln/agent.json on the device: this test's registry (or a link in front of it on
        `port`), as the guest sees it."""
        port = port or int(self.registry.address.rsplit(":", 1)[1])
        assert self.registry.lookaside is not None
        sig_port = self.registry.lookaside.rsplit(":", 1)[1]
        config = {"registry": f"{vm.HOST_FROM_GUEST}:{port}", "lookaside": f"http://{vm.HOST_FROM_GUEST}:{sig_port}",
                  "insecure": True}
        return {**config, "channel": channel} if channel else config

    def release(self, version: str, project: Path | None = None, channel: str = "stable") -> dict[str, Any]:
        """Build VERSION (from a project copy when given), sign it, push it, move the channel."""
        with project_dir(project) as proj:
            hc = load_class(self.cls, proj / "images")
            ctx = kiln_test_context(self.state)
            build_class(ctx, hc, source=f"images/{hc.file_name}", version=version)
            return push_signed(ctx, self.cls, version, self.registry.address, key=self.key,
                               lookaside_dir=self.signatures, channel=channel, tls_verify=False)

    def release_derived(self, base_ref: str, version: str, channel: str, *, payload_mib: int = 0,
                        initramfs: bytes | None = None) -> str:
        """Sign and push an image made from BASE_REF (see derive_image) as VERSION and CHANNEL."""
        layout = self.tmp / f"derived-{version}"
        derive_image(self.state, base_ref, version, layout, payload_mib=payload_mib, initramfs=initramfs)
        digest = publish(self.registry.address, self.repo, layout, version, key=self.key, lookaside=self.signatures,
                         cls=self.cls, tags=[version, channel], state=self.state)
        self.name_in_channel(version, channel, digest)
        return digest

    def refresh_channel(self) -> None:
        """`kiln channel refresh`: a new snapshot and timestamp for devices to fetch."""
        open_repository(self.signatures, self.key.directory).refresh()

    def name_in_channel(self, version: str, channel: str, digest: str, compatible: str | None = None) -> None:
        """What `kiln release` does after the push: name VERSION (DIGEST) in CHANNEL's TUF targets, which
        the image's agent reads (the image trusts the dev key's TUF root)."""
        compatible = compatible or load_class(self.cls, ROOT / "images").spec.compatible
        raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                   f"docker://{self.registry.address}/{self.repo}@{digest}"], capture=True, quiet=True).stdout
        publish_release(self.signatures, self.key.directory,
                        TufRelease(self.cls, channel, version, digest, len(raw), compatible, None, self.repo))

    def log_mark(self) -> int:
        return len((self.registry.root / "registry.log").read_text(errors="replace"))

    def blobs_fetched_since(self, mark: int) -> set[str]:
        text = (self.registry.root / "registry.log").read_text(errors="replace")[mark:]
        return {m.group(1) for m in GET_BLOB.finditer(text)}


@contextlib.contextmanager
def serving_releases(tmp: Path, cls: str = QEMU_CLASS) -> Iterator[Releases]:
    """A registry and signature server on the host's loopback, and the key CLS's image trusts."""
    state = kiln_test_state()
    key = resolve_signing_key(load_class(cls, ROOT / "images"), None)
    with running_registry(tmp / "registry", lookaside_dir=tmp / "signatures") as info:
        yield Releases(info, key, tmp / "signatures", state, tmp, cls)


def derive_image(state: StateDir, base_ref: str, version: str, layout: Path, *, payload_mib: int = 0,
                 initramfs: bytes | None = None) -> None:
    """An image FROM BASE_REF that says it is VERSION (release.json and the version label), in an
    OCI layout under the name VERSION. `payload_mib` adds a layer of that many MiB of incompressible
    bytes (a big download); `initramfs` replaces every kernel's initramfs.img (a release that
    cannot boot). The base's layers stay as they are: a device that runs it fetches only the rest."""
    ctx = layout.parent / f"{layout.name}-context"
    (ctx / "payload/usr/share/kiln-test").mkdir(parents=True, exist_ok=True)
    lines = [f"FROM {base_ref}"]
    if payload_mib:
        blob = random.Random(version).randbytes(payload_mib * 2**20)  # test data, the same for a version
        (ctx / "payload/usr/share/kiln-test/payload.bin").write_bytes(blob)
        lines.append("COPY payload/ /")
    (ctx / "initramfs.img").write_bytes(initramfs or b"")
    (ctx / "derive.py").write_text(
        "import json, pathlib, shutil, sys\n"
        "p = pathlib.Path('/usr/lib/kiln/release.json')\n"
        "d = json.loads(p.read_text()); d['version'] = sys.argv[1]; p.write_text(json.dumps(d))\n"
        "new = pathlib.Path('/ctx/initramfs.img')\n"
        "for old in pathlib.Path('/usr/lib/modules').glob('*/initramfs.img') if new.stat().st_size else []:\n"
        "    shutil.copyfile(new, old)\n")
    lines += [f"RUN --mount=type=bind,source=.,target=/ctx python3 -B /ctx/derive.py {version}",
              f'LABEL org.opencontainers.image.version="{version}"']
    (ctx / "Containerfile").write_text("\n".join(lines) + "\n")
    tag = f"localhost/kiln-test-derived:{version}"
    env = state.engine_env()
    run(["podman", "build", "--quiet", "--layers", "-t", tag, "-f", ctx / "Containerfile", ctx], env=env,
        capture=True)
    resign_boot(state, tag, version, layout.parent / f"{layout.name}-boot")
    run(["podman", "push", "--quiet", tag, f"oci:{layout}:{version}"], env=env, capture=True)


def resign_boot(state: StateDir, tag: str, version: str, workdir: Path) -> None:
    """A derived image of a class with verified boot gets its own boot layer, as `kiln build` makes one: UKIs
    built from its (maybe changed) kernel and initramfs, bound to its layers, signed with the dev db key.
    The base's boot layer is then one of the root's layers, like any other."""
    inspect = run(["podman", "image", "inspect", "--format", "json", tag], env=state.engine_env(), capture=True,
                  quiet=True)
    labels = json.loads(inspect.stdout)[0].get("Labels") or {}
    if labels.get(contract.LABEL_BOOT) != contract.BOOT_UKI:
        return
    hc = load_class(labels[contract.LABEL_CLASS], ROOT / "images")
    key = resolve_signing_key(hc, None)
    keys = resolve_secureboot_keys(key.directory, development=True)
    make_boot_layer(kiln_test_context(state), cls=hc.name, version=version, ref=tag, image_id=tag,
                    architecture=hc.spec.architecture.value, compression=hc.spec.disk.compression, keys=keys,
                    passphrase=None, epoch=DEFAULT_EPOCH, workdir=workdir)


def newc_archive(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs format (newc): {name: (mode, data)}."""
    out = bytearray()

    def member(ino: int, name: str, mode: int, data: bytes) -> None:
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        out.extend(b"070701" + "".join(f"{f:08X}" for f in fields).encode() + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, (mode, data)) in enumerate(sorted(files.items()), start=1):
        member(ino, name, mode, data)
    member(0, "TRAILER!!!", 0, b"")
    return bytes(out) + b"\0" * (-len(out) % 512)


def unbootable_initramfs() -> bytes:
    """An initramfs whose /init cannot run (its interpreter is missing): the kernel finds no working
    init and panics; with panic=10 on the command line it reboots, and boot counting takes over."""
    return newc_archive({"init": (0o100755, b"#!/bin/kiln-test-missing-shell\n")})


def configure(machine: vm.VM, releases: Releases, *, port: int | None = None, channel: str | None = None,
              extra: dict[str, Any] | None = None) -> None:
    """Point the device at this test's registry (and EXTRA agent settings: a fleet service). The test drives
    the agent itself: the periodic kiln-agent.timer (first run 5-15 min after each boot) and the report timer
    are masked so they cannot race it."""
    config = json.dumps({**releases.guest_config(port=port, channel=channel), **(extra or {})})
    machine.ssh("systemctl mask --now kiln-agent.timer kiln-agent-report.timer; "
                f"mkdir -p /etc/kiln && echo '{config}' > /etc/kiln/agent.json")


def agent(machine: vm.VM, *args: str) -> vm.SSHResult:
    return machine.ssh("kiln-agent " + " ".join(args) + " 2>&1", check=False, timeout=900)


def status(machine: vm.VM) -> dict[str, Any]:
    return dict(json.loads(machine.ssh("kiln-agent status --json").stdout))


def slot_digest(machine: vm.VM, slot: str) -> str:
    return machine.ssh(f"head -c 64M /dev/disk/by-partlabel/root-{slot} | sha256sum").stdout.split()[0]


@dataclass(frozen=True)
class Boot:
    """One power-on of the device in `boot_until_healthy_on`."""

    slot: str | None  # from the kernel command line on the console; None: no kernel started
    seconds: float  # from QEMU's start to its exit (a guest reboot) or to the healthy check
    console: str  # this boot's console

    def __repr__(self) -> str:
        return f"slot {self.slot or '?'} for {self.seconds:.0f} s"


KERNEL_SLOT = re.compile(r"Kernel command line: .*\bkiln\.slot=([ab])\b")


@contextlib.contextmanager
def boot_until_healthy_on(cfg: vm.VMConfig, slot: str, *, max_boots: int = 6,
                          boot_timeout: float = 900) -> Iterator[tuple[vm.VM, list[Boot]]]:
    """Power the device on until a boot of SLOT passes its health checks; yield that running VM
    and every boot so far (the healthy one last).

    Each boot is a fresh QEMU with -no-reboot: a failing trial boot (FailureAction=reboot, or a
    kernel panic with panic=10) ends QEMU and the next power-on follows, which is what the
    firmware's reset does on a device. In-QEMU resets under TCG were seen to hang the
    firmware on a slower machine; a fresh QEMU per boot is steadier (design.md).
    """
    if not cfg.no_reboot:
        raise ValueError("boot_until_healthy_on needs a VMConfig with no_reboot=True")
    boots: list[Boot] = []
    for n in range(1, max_boots + 1):
        with vm.start_vm(cfg) as machine:
            healthy = _healthy_or_rebooted(machine, slot, boot_timeout, boots)
            console = machine.console_text()
            (machine.paths.workdir / f"console-boot{n}.log").write_text(console)
            found = KERNEL_SLOT.search(console)
            boots.append(Boot(found.group(1) if found else None, time.monotonic() - machine.started, console))
            if healthy:
                yield machine, boots
                return
    raise VMError(f"no healthy boot of slot {slot} in {max_boots} power-ons: "
                  f"{boots}; ESP entries: {esp_entries(cfg.disk)}")


def _healthy_or_rebooted(machine: vm.VM, slot: str, timeout: float, boots: list[Boot]) -> bool:
    """True once SLOT is healthy; False when the guest rebooted (QEMU exited), or when the firmware started
    nothing and waits at its boot manager (a refused UKI): the power is cut there, as a device's platform
    watchdog does, and the next power-on follows."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        if not machine.running:
            return False
        if machine.firmware_gave_up():
            machine.kill()
            return False
        seen = machine.healthy_slot()
        if seen == slot:
            return True
        time.sleep(3)
    history = boots or "none"
    last = f"healthy on slot {seen}" if seen else "not healthy"
    raise machine.error(f"boot {len(boots) + 1} neither rebooted nor became healthy on slot {slot} within "
                        f"{timeout:.0f} s (last: {last}); earlier boots: {history}")


def esp_entries(disk: Path) -> list[str]:
    """The boot entries on a powered-off disk's ESP (read with mtools, nothing mounted): type #1 (.conf in
    loader/entries) and type #2 (UKIs in EFI/Linux)."""
    offset = partition_offset(disk, "esp")
    found = []
    for folder, suffix in (("::/loader/entries", ".conf"), ("::/EFI/Linux", ".efi")):
        out = run(["mdir", "-b", "-i", f"{disk}@@{offset}", folder], capture=True, check=False,
                  quiet=True, env={"MTOOLS_SKIP_CHECK": "1"}).stdout.decode(errors="replace")
        found += [line.rsplit("/", 1)[-1] for line in out.split() if line.endswith(suffix)]
    return sorted(found)
