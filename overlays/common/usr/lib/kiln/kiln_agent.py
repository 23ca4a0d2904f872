#!/usr/bin/env python3
"""kiln-agent: signed A/B updates from an OCI registry, for a Kiln device.

Subcommands:
  check              look up the channel tag, read the candidate's manifest and labels
                     (no layers), decide whether to take it
  update [--no-reboot]
                     check, then: pull by digest into the OCI layout on the data
                     partition (skopeo, with the baked policy.json: the signature is
                     verified; only missing blobs move), decide again from the verified
                     config, unpack (umoci), write the INACTIVE slot (mkfs.erofs), read it
                     back and compare hashes, install kernel + initramfs on the ESP, write
                     the boot entry kiln-<version>-<slot>+<tries>.conf atomically, reboot
  status [--json]    booted slot and version, pending update, last result, rollbacks
  boot               on-boot reconciliation (kiln-agent-boot.service): a trial boot of the
                     slot we installed that got blessed is a success; a boot of the other
                     slot means the new one was rolled back: record why, blocklist it
  self-test          the agent can run: config, policy, key and tools present, state
                     writable (kiln-health-agent.service, gates boot-complete.target)

Configuration: /usr/lib/kiln/agent.json (baked defaults), overridden key by key by
/etc/kiln/agent.json, then by --config FILE (or $KILN_AGENT_CONFIG). Keys: registry
(host:port[/path]), repository (default kiln/<class>), channel (default: the image's),
lookaside (signature server URL), insecure (plain HTTP / no TLS verification), policy,
release, stateDir, ociDir, workDir, esp, slots {a, b: block devices}, partuuids {a, b}
(default: found under /dev/disk/by-partuuid), cmdline, efivars, rebootCommand.

State: <stateDir>/state.json, replaced atomically after every step (a journal), so an
interrupted run resumes or starts over; a slot is trusted only once its verification
record (digest, sha256 of what was read back) is in the state.

Exit codes:
  0   ok (check: an update is available; update: installed, or rebooting into it)
  1   unexpected failure (a bug: please report it with the output)
  2   up to date: the channel carries the running version
  3   refused: the candidate's compatible string is not this device's
  4   refused: not newer than the running version, below the running image's
      minVersion, or the candidate needs a newer running version (its minVersion)
  5   refused: this version failed on this device before (blocklisted)
  6   refused: signature or policy check failed (nothing was written)
  7   registry or signature server unreachable, or the channel tag is missing
  8   not enough space on the data partition or the slot
  9   writing or verifying the slot, the kernel or the boot entry failed
  10  another kiln-agent run holds the lock
  11  configuration missing or invalid
  64  usage

Testing hooks: KILN_AGENT_ROOT=DIR reads the two config files under DIR instead of /
(a fake device in a temp directory). KILN_AGENT_FAULT=after:<phase> exits with 137 right after <phase> is
journaled (a crash at a known point). KILN_AGENT_FAULT=stop:<point> stops there instead: it writes
<point> to /run/kiln-agent.fault (KILN_AGENT_FAULT_MARK) and sleeps, so a test can cut the power
(kill the VM) at that point. Phases: fetched, invalidated, built, written, verified, kernel, entry;
stop: also takes `writing` (half of the slot written, not yet fsynced as a whole).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # /usr is read-only on the device

OK, INTERNAL, UP_TO_DATE, INCOMPATIBLE, NOT_NEWER, BLOCKLISTED = 0, 1, 2, 3, 4, 5
SIGNATURE, UNREACHABLE, NO_SPACE, WRITE_FAILED, LOCKED, CONFIG, USAGE = 6, 7, 8, 9, 10, 11, 64

DEFAULTS_FILE = "/usr/lib/kiln/agent.json"
OVERRIDE_FILE = "/etc/kiln/agent.json"
CONFIG_ENV = "KILN_AGENT_CONFIG"
ROOT_ENV = "KILN_AGENT_ROOT"
FAULT_ENV = "KILN_AGENT_FAULT"
FAULT_MARK_ENV = "KILN_AGENT_FAULT_MARK"
STATE_SCHEMA = 1
SLOTS = ("a", "b")
EFI_LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
ENTRY_RE = re.compile(r"^kiln-(?P<version>.+)-(?P<slot>[ab])(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf$")
EROFS_MAGIC = 0xE0F5E1E2
EROFS_COMPRESSORS = {"none": None, "lz4": "lz4", "lz4hc": "lz4hc,12"}
CHUNK = 4 * 1024 * 1024
MAX_ROLLBACKS = 20
PHASES = ("fetched", "invalidated", "built", "written", "verified", "kernel", "entry")
LABEL_COMPATIBLE = "dev.kiln.compatible"
LABEL_VERSION = "org.opencontainers.image.version"
LABEL_MIN_VERSION = "dev.kiln.min-version"
LABEL_CLASS = "dev.kiln.class"


class AgentError(Exception):
    """A failure with an exit code; the message says what and where."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def log(message: str) -> None:
    print(f"kiln-agent: {message}", file=sys.stderr, flush=True)


# --- versions and decisions (pure) ---------------------------------------------------


def version_key(version: str) -> tuple[Any, ...]:
    """Order versions like SemVer 2.0: numeric dot parts compared as numbers (missing parts
    are 0), a pre-release (after '-' or '~') sorts before its release, build metadata
    (after '+', or '_' as in an image tag) is ignored. Non-numeric parts compare as text,
    after numbers. 1.2 < 1.10, 1.0.0-rc.1 < 1.0.0 = 1.0.0+b2."""
    core = re.split(r"[+_]", version, maxsplit=1)[0]
    m = re.match(r"^([^-~]*)(?:[-~](.*))?$", core)
    assert m is not None
    release, pre = m.group(1), m.group(2)

    def parts(text: str) -> list[tuple[int, int, str]]:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in text.split(".") if p != ""]

    rel = parts(release)
    while rel and rel[-1] == (0, 0, ""):
        rel.pop()
    # A release sorts after any of its pre-releases: (1,) > (0, ...).
    pre_key: tuple[Any, ...] = (1,) if pre is None else (0, tuple(parts(pre)))
    return (tuple(rel), pre_key)


def compare_versions(a: str, b: str) -> int:
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


@dataclass(frozen=True)
class Release:
    """What the running image says about itself (release.json)."""

    cls: str
    compatible: str
    version: str
    min_version: str | None = None
    channel: str = "stable"
    boot_tries: int = 3


@dataclass(frozen=True)
class Candidate:
    """What the channel offers (manifest digest and config labels)."""

    version: str
    compatible: str
    digest: str
    min_version: str | None = None
    cls: str | None = None


@dataclass(frozen=True)
class Decision:
    code: int
    reason: str

    @property
    def take(self) -> bool:
        return self.code == OK


def decide(running: Release, cand: Candidate, blocklist: Sequence[str] = ()) -> Decision:
    """Whether to take `cand`; the first reason that applies wins (the table in the tests)."""
    if cand.compatible != running.compatible:
        return Decision(INCOMPATIBLE, f"compatible {cand.compatible!r} is not this device's {running.compatible!r}")
    if cand.version in blocklist or cand.digest in blocklist:
        return Decision(BLOCKLISTED, f"{cand.version} ({cand.digest[:19]}) failed on this device before")
    order = compare_versions(cand.version, running.version)
    if order == 0:
        return Decision(UP_TO_DATE, f"{cand.version} is the running version")
    if order < 0:
        return Decision(NOT_NEWER, f"{cand.version} is older than the running {running.version} (no downgrades)")
    if running.min_version and compare_versions(cand.version, running.min_version) < 0:
        return Decision(NOT_NEWER, f"{cand.version} is below the running image's minVersion {running.min_version}")
    if cand.min_version and compare_versions(running.version, cand.min_version) < 0:
        return Decision(NOT_NEWER, f"{cand.version} needs {cand.min_version} or newer running first "
                                   f"(running {running.version})")
    return Decision(OK, f"{cand.version} is newer than the running {running.version}")


def candidate_from_labels(labels: dict[str, str], digest: str) -> Candidate:
    version = labels.get(LABEL_VERSION) or ""
    compatible = labels.get(LABEL_COMPATIBLE) or ""
    if not version or not compatible:
        raise AgentError(INCOMPATIBLE, f"image {digest[:19]} is not a Kiln release: labels {LABEL_VERSION} "
                                       f"and {LABEL_COMPATIBLE} are required")
    return Candidate(version=version, compatible=compatible, digest=digest,
                     min_version=labels.get(LABEL_MIN_VERSION) or None, cls=labels.get(LABEL_CLASS))


# --- boot entries (pure) ---------------------------------------------------------------


def other_slot(slot: str) -> str:
    return "b" if slot == "a" else "a"


def entry_name(version: str, slot: str, tries: int | None = None) -> str:
    """`kiln-<version>-<slot>.conf`; with tries, systemd's boot counter `+N` (a trial entry)."""
    return f"kiln-{version}-{slot}" + (f"+{tries}" if tries is not None else "") + ".conf"


@dataclass(frozen=True)
class Entry:
    name: str
    version: str
    slot: str
    tries_left: int | None  # None: blessed (or never counted)
    tries_done: int | None

    @property
    def blessed(self) -> bool:
        return self.tries_left is None

    @property
    def exhausted(self) -> bool:
        return self.tries_left == 0


def parse_entry_name(name: str) -> Entry | None:
    m = ENTRY_RE.match(name)
    if not m:
        return None
    left, done = m.group("left"), m.group("done")
    return Entry(name, m.group("version"), m.group("slot"), int(left) if left is not None else None,
                 int(done) if done is not None else None)


def render_entry(*, cls: str, version: str, slot: str, partuuid: str, kargs: Sequence[str]) -> str:
    """A Boot Loader Specification type #1 entry, as `kiln disk` writes slot A's."""
    options = [f"root=PARTUUID={partuuid}", "ro", "rootfstype=erofs", f"kiln.slot={slot}", *kargs]
    return (f"title Kiln {cls} {version} (slot {slot})\nversion {version}\nsort-key kiln\n"
            f"linux /kiln/{slot}/vmlinuz\ninitrd /kiln/{slot}/initramfs.img\noptions {' '.join(options)}\n")


def read_cmdline_slot(cmdline: str) -> str | None:
    for word in cmdline.split():
        if word.startswith("kiln.slot="):
            slot = word.split("=", 1)[1]
            return slot if slot in SLOTS else None
    return None


# --- files ---------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # vfat directories may refuse fsync; the rename is what matters
        if exc.errno not in (errno.EINVAL, errno.EROFS):
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a temp file next to `path`, fsync it, rename over `path`, fsync it and the directory.

    The second fsync is for vfat (the ESP): its rename makes a new directory entry with size 0
    and the real size lands only when the inode is written back. Without it, a power cut right
    after the rename leaves an empty boot entry (found by the power-cut test in QEMU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_file(path)
    fsync_dir(path.parent)


def copy_atomic(src: Path, dest: Path) -> str:
    """Copy `src` to `dest` atomically (tmp, fsync, rename, fsync again, fsync dir: see write_atomic);
    the sha256 of the bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dest)
    fsync_file(dest)
    fsync_dir(dest.parent)
    return digest.hexdigest()


def sha256_file(path: Path, size: int | None = None) -> str:
    """sha256 of a file or the first `size` bytes of a device, read past the page cache."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        remaining = size if size is not None else -1
        while remaining != 0:
            chunk = os.read(fd, CHUNK if remaining < 0 else min(CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining > 0:
                remaining -= len(chunk)
        if remaining > 0:
            raise AgentError(WRITE_FAILED, f"{path}: ended {remaining} bytes early")
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def erofs_size(path: Path) -> int:
    """The size of the erofs filesystem at the start of `path` (from its superblock)."""
    with open(path, "rb") as f:
        f.seek(1024)
        sb = f.read(40)
    if len(sb) < 40 or int.from_bytes(sb[0:4], "little") != EROFS_MAGIC:
        raise AgentError(WRITE_FAILED, f"{path}: no erofs superblock")
    return int.from_bytes(sb[36:40], "little") << sb[12]


def device_size(path: Path) -> int | None:
    """The size of a block device, None for a regular file (a test's stand-in slot)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return None
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    registry: str
    repository: str
    channel: str
    lookaside: str
    insecure: bool
    policy: Path
    release: Path
    state_dir: Path
    oci_dir: Path
    work_dir: Path
    esp: Path
    slots: dict[str, Path]
    partuuids: dict[str, str]
    cmdline: Path
    efivars: Path
    boot_id: Path
    reboot_command: tuple[str, ...]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"docker://{self.registry}/{self.repository}"


BUILTIN: dict[str, Any] = {
    "registry": "", "repository": "", "channel": "", "lookaside": "", "insecure": False,
    "policy": "/usr/lib/kiln/policy.json", "release": "/usr/lib/kiln/release.json",
    "stateDir": "/var/lib/kiln/agent", "ociDir": "/var/lib/kiln/oci", "workDir": "/var/lib/kiln/work",
    "esp": "/efi", "slots": {"a": "/dev/disk/by-partlabel/root-a", "b": "/dev/disk/by-partlabel/root-b"},
    "partuuids": {}, "cmdline": "/proc/cmdline", "efivars": "/sys/firmware/efi/efivars",
    "bootId": "/proc/sys/kernel/random/boot_id",
    "rebootCommand": ["systemctl", "reboot"],
}


def load_config(extra: str | None = None) -> tuple[Config, Release]:
    merged = dict(BUILTIN)
    root = Path(os.environ.get(ROOT_ENV) or "/")
    files = [root / DEFAULTS_FILE.lstrip("/"), root / OVERRIDE_FILE.lstrip("/")]
    if extra:
        files.append(Path(extra))
    for path in files:
        if not path.exists():
            if path == Path(extra or ""):
                raise AgentError(CONFIG, f"{path}: no such config file")
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            raise AgentError(CONFIG, f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise AgentError(CONFIG, f"{path}: expected a JSON object")
        unknown = sorted(set(data) - set(BUILTIN) - {"$comment"})
        if unknown:
            raise AgentError(CONFIG, f"{path}: unknown keys {', '.join(unknown)} (known: {', '.join(BUILTIN)})")
        merged.update(data)
    release = load_release(Path(merged["release"]))
    try:
        config = Config(
            registry=str(merged["registry"]).removeprefix("docker://").rstrip("/"),
            repository=str(merged["repository"] or f"kiln/{release.cls}"),
            channel=str(merged["channel"] or release.channel),
            lookaside=str(merged["lookaside"]).rstrip("/"),
            insecure=bool(merged["insecure"]),
            policy=Path(merged["policy"]), release=Path(merged["release"]),
            state_dir=Path(merged["stateDir"]), oci_dir=Path(merged["ociDir"]), work_dir=Path(merged["workDir"]),
            esp=Path(merged["esp"]),
            slots={s: Path(merged["slots"][s]) for s in SLOTS},
            partuuids={str(k): str(v) for k, v in dict(merged["partuuids"]).items()},
            cmdline=Path(merged["cmdline"]), efivars=Path(merged["efivars"]), boot_id=Path(merged["bootId"]),
            reboot_command=tuple(str(a) for a in merged["rebootCommand"]),
            raw=merged,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AgentError(CONFIG, f"agent configuration: bad value: {exc}") from None
    return config, release


def load_release(path: Path) -> Release:
    try:
        data = read_json(path)
        return Release(cls=str(data["class"]), compatible=str(data["compatible"]), version=str(data["version"]),
                       min_version=data.get("minVersion") or None, channel=str(data.get("channel") or "stable"),
                       boot_tries=int(data.get("bootTries") or 3))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AgentError(CONFIG, f"{path}: cannot read the release metadata: {exc}") from None


def require_registry(config: Config) -> None:
    missing = [k for k, v in (("registry", config.registry), ("lookaside", config.lookaside)) if not v]
    if missing:
        raise AgentError(CONFIG, f"no {' or '.join(missing)} configured: set it in {OVERRIDE_FILE} "
                                 f"(defaults in {DEFAULTS_FILE})")
    if not config.policy.is_file():
        raise AgentError(CONFIG, f"{config.policy}: the signature policy is missing; refusing to pull anything")


# --- state -----------------------------------------------------------------------------


class State:
    """state.json: pending update (with its journaled phase), slot trust records, results."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"schema": STATE_SCHEMA, "pending": None, "slots": {}, "lastResult": None,
                                     "rollbacks": [], "blocklist": []}
        if path.exists():
            try:
                loaded = read_json(path)
            except (OSError, ValueError) as exc:
                # Only ever replaced atomically: unreadable means the disk lies. Keep a copy, start clean
                # (no slot is trusted, so nothing half-written can be booted).
                log(f"{path}: unreadable ({exc}); keeping it as {path.name}.corrupt and starting over")
                path.replace(path.with_name(path.name + ".corrupt"))
                loaded = {}
            if isinstance(loaded, dict) and loaded.get("schema") == STATE_SCHEMA:
                self.data.update(loaded)

    def save(self) -> None:
        write_atomic(self.path, (json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode(), 0o640)

    @property
    def pending(self) -> dict[str, Any] | None:
        return self.data.get("pending")

    def journal(self, phase: str, **fields: Any) -> None:
        """Record that `phase` of the pending update is done, durably, then the fault hook."""
        pending = self.data["pending"]
        pending.update(fields)
        pending["phase"] = phase
        pending.setdefault("phases", {})[phase] = now()
        self.save()
        log(f"journal: {phase}")
        fault_point(phase)

    def phase_done(self, phase: str) -> bool:
        pending = self.pending or {}
        return phase in (pending.get("phases") or {})

    def trust(self, slot: str) -> dict[str, Any] | None:
        return (self.data.get("slots") or {}).get(slot)

    def set_trust(self, slot: str, record: dict[str, Any] | None) -> None:
        self.data.setdefault("slots", {})[slot] = record

    def finish(self, result: str, **fields: Any) -> None:
        self.data["lastResult"] = {"result": result, "time": now(), **fields}
        self.save()


def fault_point(point: str) -> None:
    """The testing hook (KILN_AGENT_FAULT): crash or stop at a named point."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"after:{point}":
        log(f"{FAULT_ENV}={fault}: exiting as if the power went out")
        os._exit(137)
    if fault == f"stop:{point}":
        mark = Path(os.environ.get(FAULT_MARK_ENV) or "/run/kiln-agent.fault")
        log(f"{FAULT_ENV}={fault}: stopped at {point} (told {mark}); waiting for the power to go out")
        write_atomic(mark, f"{point}\n".encode())
        while True:
            time.sleep(3600)


def read_boot_id(config: Config) -> str | None:
    try:
        return config.boot_id.read_text().strip() or None
    except OSError:
        return None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError(LOCKED, f"another kiln-agent run holds {state_dir / '.lock'}") from None
        yield


# --- boot control -----------------------------------------------------------------------


class BootControl:
    """What the agent needs from the boot loader. One backend per boot-control kind."""

    name = "abstract"

    def booted_slot(self) -> str | None:
        raise NotImplementedError

    def selected_entry(self) -> str | None:
        raise NotImplementedError

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def remove_slot_entries(self, slot: str) -> list[str]:
        raise NotImplementedError

    def install_kernel(self, slot: str, kernel: Path, initrd: Path) -> dict[str, str]:
        raise NotImplementedError

    def add_trial_entry(self, *, cls: str, version: str, slot: str, tries: int, kargs: Sequence[str]) -> str:
        raise NotImplementedError


class SystemdBoot(BootControl):
    """systemd-boot with Automatic Boot Assessment: BLS entries on the ESP, `+N` counters.

    The loader picks `default kiln-*` by version; a trial entry (`+N`) is tried N
    times, systemd-bless-boot renames it to `kiln-<v>-<slot>.conf` once
    boot-complete.target is reached, and an exhausted one sorts last so the old
    entry boots again. Never pins `default` (a pinned trial entry boots forever)."""

    name = "systemd-boot"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.entries_dir = config.esp / "loader" / "entries"

    def booted_slot(self) -> str | None:
        try:
            return read_cmdline_slot(self.config.cmdline.read_text())
        except OSError:
            return None

    def selected_entry(self) -> str | None:
        path = self.config.efivars / f"LoaderEntrySelected-{EFI_LOADER_GUID}"
        try:
            raw = path.read_bytes()[4:]  # 4 bytes of attributes, then UTF-16LE, NUL-terminated
        except OSError:
            return None
        return raw.decode("utf-16-le", errors="replace").rstrip("\0") or None

    def entries(self) -> list[Entry]:
        if not self.entries_dir.is_dir():
            return []
        found = [parse_entry_name(p.name) for p in sorted(self.entries_dir.iterdir())]
        return [e for e in found if e is not None]

    def remove_slot_entries(self, slot: str) -> list[str]:
        removed = []
        for entry in self.entries():
            if entry.slot == slot:
                (self.entries_dir / entry.name).unlink()
                removed.append(entry.name)
        if removed:
            fsync_dir(self.entries_dir)
        return removed

    def install_kernel(self, slot: str, kernel: Path, initrd: Path) -> dict[str, str]:
        dest = self.config.esp / "kiln" / slot
        hashes = {}
        for name, src in (("vmlinuz", kernel), ("initramfs.img", initrd)):
            hashes[name] = copy_atomic(src, dest / name)
            if sha256_file(dest / name) != hashes[name]:
                raise AgentError(WRITE_FAILED, f"{dest / name} reads back different bytes than were written")
        return hashes

    def add_trial_entry(self, *, cls: str, version: str, slot: str, tries: int, kargs: Sequence[str]) -> str:
        name = entry_name(version, slot, tries)
        text = render_entry(cls=cls, version=version, slot=slot, partuuid=self.partuuid(slot), kargs=kargs)
        write_atomic(self.entries_dir / name, text.encode())
        return name

    def partuuid(self, slot: str) -> str:
        if slot in self.config.partuuids:
            return self.config.partuuids[slot]
        target = os.path.realpath(self.config.slots[slot])
        by_uuid = Path("/dev/disk/by-partuuid")
        for link in sorted(by_uuid.iterdir()) if by_uuid.is_dir() else []:
            if os.path.realpath(link) == target:
                return link.name
        raise AgentError(CONFIG, f"no PARTUUID found for slot {slot} ({self.config.slots[slot]}); "
                                 "set partuuids in the agent config")


class NvBootCtrl(BootControl):
    """NVIDIA Jetson A/B (nvbootctrl / UEFI capsule). Not implemented: it raises, by design."""

    name = "nvbootctrl"

    def __init__(self, config: Config) -> None:
        raise NotImplementedError("the Jetson nvbootctrl boot-control backend is not implemented yet; "
                                  "this device cannot be updated by kiln-agent")


def make_boot_control(config: Config, kind: str) -> BootControl:
    if kind == "systemd-boot":
        return SystemdBoot(config)
    if kind == "nvbootctrl":
        return NvBootCtrl(config)
    raise AgentError(CONFIG, f"unknown boot control {kind!r}")


# --- external tools ----------------------------------------------------------------------


def run(argv: Sequence[str], *, what: str, code: int, capture: bool = True, timeout: float | None = None,
        env: dict[str, str] | None = None) -> str:
    tool = shutil.which(argv[0], path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if tool is None:
        raise AgentError(CONFIG, f"{what}: {argv[0]} is not installed")
    log("+ " + " ".join(argv))
    try:
        proc = subprocess.run([tool, *argv[1:]], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, check=False)
    except subprocess.TimeoutExpired:
        raise AgentError(code, f"{what}: {argv[0]} timed out after {timeout} s") from None
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise AgentError(classify(err, code), f"{what}: {argv[0]} failed ({proc.returncode}): {err[-1500:]}")
    return proc.stdout.decode(errors="replace") if capture else ""


def classify(stderr: str, default: int) -> int:
    """Map skopeo/umoci/mkfs messages to exit codes."""
    low = stderr.lower()
    if "no space left" in low:
        return NO_SPACE
    if "signature" in low or "source image rejected" in low or "policy" in low:
        return SIGNATURE
    if any(s in low for s in ("connection refused", "no such host", "i/o timeout", "manifest unknown",
                              "connection reset", "network is unreachable", "eof", "name unknown",
                              "reading manifest")):
        return UNREACHABLE
    return default


def write_registries_d(config: Config) -> Path:
    """A registries.d telling skopeo where this registry's signatures are (runtime, not baked)."""
    d = config.state_dir / "registries.d"
    host = config.registry.split("/", 1)[0]
    write_atomic(d / "kiln.yaml", (f"# Written by kiln-agent from its configuration.\ndocker:\n"
                                   f"  {host}:\n    lookaside: {config.lookaside}\n").encode())
    return d


def skopeo(config: Config, *args: str, what: str, code: int, timeout: float | None = None) -> str:
    regd = write_registries_d(config)
    return run(["skopeo", "--policy", str(config.policy), "--registries.d", str(regd), *args],
               what=what, code=code, timeout=timeout)


def tls_flag(config: Config, side: str) -> list[str]:
    return [f"--{side}tls-verify=false"] if config.insecure else []


# --- check ------------------------------------------------------------------------------------


def inspect_channel(config: Config) -> Candidate:
    ref = f"{config.source}:{config.channel}"
    out = skopeo(config, "inspect", "--no-tags", *tls_flag(config, ""), "--retry-times", "2", ref,
                 what=f"reading {ref}", code=UNREACHABLE, timeout=120)
    try:
        data = json.loads(out)
        return candidate_from_labels(dict(data.get("Labels") or {}), str(data["Digest"]))
    except (ValueError, KeyError) as exc:
        raise AgentError(UNREACHABLE, f"reading {ref}: unexpected skopeo output: {exc}") from None


def blocklist(state: State) -> list[str]:
    return list(state.data.get("blocklist") or [])


def cmd_check(config: Config, release: Release, state: State) -> tuple[Decision, Candidate]:
    require_registry(config)
    cand = inspect_channel(config)
    decision = decide(release, cand, blocklist(state))
    return decision, cand


# --- update -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    layout: Path
    tree: Path
    image: Path


def work_paths(config: Config) -> Paths:
    return Paths(layout=config.oci_dir, tree=config.work_dir / "rootfs", image=config.work_dir / "root.erofs")


def oci_ref_name(cand_version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", cand_version)


def fetch(config: Config, cand: Candidate, paths: Paths) -> None:
    """skopeo copy by digest into the OCI layout: the signature is verified with the baked
    policy, blobs already in the layout are not downloaded again."""
    paths.layout.mkdir(parents=True, exist_ok=True)
    for leftover in paths.layout.glob("oci-put-blob*"):  # skopeo's temp blobs from a run that died mid-download
        log(f"removing {leftover.name} ({leftover.stat().st_size} bytes) left by an interrupted download")
        leftover.unlink()
    skopeo(config, "copy", *tls_flag(config, "src-"), "--retry-times", "3", "--remove-signatures",
           f"{config.source}@{cand.digest}", f"oci:{paths.layout}:{oci_ref_name(cand.version)}",
           what=f"pulling {config.source}@{cand.digest[:19]}", code=UNREACHABLE)


def layout_manifest(layout: Path, ref: str) -> dict[str, Any]:
    index = read_json(layout / "index.json")
    for desc in index.get("manifests", []):
        if (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref:
            return dict(read_json(blob_path(layout, desc["digest"])))
    raise AgentError(WRITE_FAILED, f"{layout}: no image named {ref}")


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise AgentError(WRITE_FAILED, f"bad digest {digest!r}")
    return layout / "blobs" / algo / hexd


def verified_labels(layout: Path, ref: str) -> dict[str, str]:
    manifest = layout_manifest(layout, ref)
    config = read_json(blob_path(layout, manifest["config"]["digest"]))
    return dict((config.get("config") or {}).get("Labels") or {})


def gc_layout(layout: Path, keep: Sequence[str]) -> int:
    """Drop images other than `keep` from the layout index and every blob they alone used."""
    index_path = layout / "index.json"
    if not index_path.exists():
        return 0
    index = read_json(index_path)
    kept = [d for d in index.get("manifests", [])
            if (d.get("annotations") or {}).get("org.opencontainers.image.ref.name") in keep]
    index["manifests"] = kept
    write_atomic(index_path, json.dumps(index).encode())
    live = set()
    for desc in kept:
        live.add(desc["digest"])
        manifest = read_json(blob_path(layout, desc["digest"]))
        live.add(manifest["config"]["digest"])
        live.update(layer["digest"] for layer in manifest.get("layers", []))
    freed = 0
    blobs = layout / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.is_dir() else []:
        if f"sha256:{blob.name}" not in live:
            freed += blob.stat().st_size
            blob.unlink()
    return freed


def unpack(layout: Path, ref: str, tree: Path) -> Path:
    """umoci raw unpack into `tree` (removed first); returns the rootfs."""
    if tree.exists():
        shutil.rmtree(tree)
    tree.parent.mkdir(parents=True, exist_ok=True)
    argv = ["umoci", "raw", "unpack", *([] if os.geteuid() == 0 else ["--rootless"]),
            "--image", f"{layout}:{ref}", str(tree)]
    run(argv, what=f"unpacking {ref}", code=WRITE_FAILED)
    return tree


def check_tree(tree: Path, cand: Candidate) -> tuple[Release, Path, Path, list[str], str | None]:
    """The unpacked image must agree with its labels; find its kernel, initramfs, kargs."""
    release = load_release(tree / "usr/lib/kiln/release.json")
    if release.compatible != cand.compatible or release.version != cand.version:
        raise AgentError(INCOMPATIBLE, f"the image's release.json ({release.compatible} {release.version}) "
                                       f"does not match its labels ({cand.compatible} {cand.version})")
    modules = tree / "usr/lib/modules"
    kernels = sorted(p for p in modules.glob("*/vmlinuz") if (p.parent / "initramfs.img").is_file()) \
        if modules.is_dir() else []
    if not kernels:
        raise AgentError(WRITE_FAILED, "the image has no /usr/lib/modules/<kver>/vmlinuz + initramfs.img")
    kernel = kernels[-1]
    kargs: list[str] = []
    kargs_dir = tree / "usr/lib/bootc/kargs.d"
    for toml in sorted(kargs_dir.glob("*.toml")) if kargs_dir.is_dir() else []:
        try:
            kargs += [str(a) for a in tomllib.loads(toml.read_text()).get("kargs", [])]
        except (OSError, ValueError) as exc:
            raise AgentError(WRITE_FAILED, f"{toml.relative_to(tree)}: {exc}") from None
    compression = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        klass = read_json(tree / "usr/lib/kiln/class.json")
        compression = EROFS_COMPRESSORS.get(str(klass["spec"]["disk"]["compression"]))
    return release, kernel, kernel.parent / "initramfs.img", kargs, compression


def build_erofs(tree: Path, image: Path, compression: str | None) -> str:
    image.unlink(missing_ok=True)
    argv = ["mkfs.erofs", "--quiet", "-T0", *([f"-z{compression}"] if compression else []), str(image), str(tree)]
    run(argv, what="building the root filesystem", code=WRITE_FAILED)
    return sha256_file(image)


def write_slot(image: Path, device: Path) -> int:
    """Copy the erofs image onto the slot from offset 0, fsync. Never truncates a device."""
    size = image.stat().st_size
    limit = device_size(device) if device.exists() else None
    if limit is not None and size > limit:
        raise AgentError(NO_SPACE, f"the new root filesystem ({size} bytes) does not fit {device} ({limit} bytes)")
    flags = os.O_WRONLY | (0 if device.exists() else os.O_CREAT)
    out = os.open(device, flags, 0o600)
    try:
        written, half = 0, (size // 2 if os.environ.get(FAULT_ENV) == "stop:writing" else -1)
        with open(image, "rb") as fin:
            while chunk := fin.read(min(CHUNK, half - written) if written < half else CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                written += len(chunk)
                if written == half:  # the testing hook: the power goes out half way through
                    os.fdatasync(out)  # what the page cache had written back by then
                    fault_point("writing")
        os.fsync(out)
    finally:
        os.close(out)
    return size


def cmd_update(config: Config, release: Release, state: State, boot: BootControl, *, reboot: bool) -> int:
    require_registry(config)
    booted = boot.booted_slot()
    if booted is None:
        raise AgentError(CONFIG, f"cannot tell the booted slot: no kiln.slot= in {config.cmdline}")
    target = other_slot(booted)
    decision, cand = cmd_check(config, release, state)
    pending = state.pending
    if pending and pending.get("phase") == "entry" and pending.get("digest") == cand.digest:
        log(f"{cand.version} is installed in slot {pending['slot']} and waits for a reboot")
        return finish_install(config, state, reboot)
    if decision.code == UP_TO_DATE:
        log(f"up to date: {decision.reason}")
        return UP_TO_DATE
    if not decision.take:
        raise AgentError(decision.code, f"not updating: {decision.reason}")
    if pending and (pending.get("digest") != cand.digest or pending.get("slot") != target):
        log(f"dropping the interrupted update to {pending.get('version')} (slot {pending.get('slot')}, "
            f"phase {pending.get('phase')}): the channel now has {cand.version}")
        pending = None
    if pending:
        log(f"resuming the update to {cand.version} after phase {pending.get('phase')}")
    else:
        state.data["pending"] = {"version": cand.version, "digest": cand.digest, "slot": target,
                                 "from": release.version, "fromSlot": booted, "started": now(),
                                 "phase": "started", "phases": {}}
        state.save()
    try:
        install(config, release, state, boot, cand, target)
    except OSError as exc:
        error = AgentError(NO_SPACE if exc.errno == errno.ENOSPC else WRITE_FAILED, f"installing {cand.version}: {exc}")
        failed(config, state, cand, error)
        raise error from None
    except AgentError as exc:
        failed(config, state, cand, exc)
        raise
    return finish_install(config, state, reboot)


def install(config: Config, release: Release, state: State, boot: BootControl, cand: Candidate,
            slot: str) -> None:
    paths = work_paths(config)
    ref = oci_ref_name(cand.version)
    device = config.slots[slot]
    # 1. Pull and verify (idempotent: a resumed pull fetches only what is missing).
    if not state.phase_done("fetched"):
        fetch(config, cand, paths)
        state.journal("fetched")
    verified = candidate_from_labels(verified_labels(paths.layout, ref), cand.digest)
    again = decide(release, verified, blocklist(state))
    if not again.take:  # the labels we decided on were not verified; these are
        raise AgentError(again.code, f"not updating (verified image): {again.reason}")
    # 2. Stop trusting the target slot before touching it: no entry may point at it.
    if not state.phase_done("invalidated"):
        state.set_trust(slot, None)
        removed = boot.remove_slot_entries(slot)
        state.journal("invalidated", removedEntries=removed)
    # 3. Build the filesystem (redone on resume unless its image survived with the same hash).
    pending = state.pending or {}
    tree: Path | None = None  # a tree is used only if unpacked completely by this run
    image_ok = state.phase_done("built") and paths.image.exists() and \
        sha256_file(paths.image) == pending.get("imageSha256")
    if not image_ok:
        tree = unpack(paths.layout, ref, paths.tree)
        new_release, _, _, _, compression = check_tree(tree, verified)
        sha = build_erofs(tree, paths.image, compression)
        state.journal("built", imageSha256=sha, imageSize=paths.image.stat().st_size,
                      bootTries=new_release.boot_tries)
    # 4. Write the slot and read it back.
    if not (state.phase_done("verified") and (state.trust(slot) or {}).get("digest") == cand.digest):
        size = write_slot(paths.image, device)
        state.journal("written")
        readback = sha256_file(device, size)
        expected = (state.pending or {})["imageSha256"]
        if readback != expected:
            raise AgentError(WRITE_FAILED, f"slot {slot} ({device}) reads back {readback[:16]}, "
                                           f"wrote {expected[:16]}: the medium is failing")
        state.set_trust(slot, {"version": cand.version, "digest": cand.digest, "sha256": readback,
                               "size": size, "verified": now()})
        state.journal("verified")
    # 5. Kernel and initramfs, from a tree unpacked completely by this run (never a leftover).
    if tree is None:
        tree = unpack(paths.layout, ref, paths.tree)
    new_release, kernel, initrd, kargs, _ = check_tree(tree, verified)
    hashes = boot.install_kernel(slot, kernel, initrd)
    state.journal("kernel", kernel=hashes)
    # 6. The trial entry, last: before it exists nothing boots the new slot.
    trust = state.trust(slot) or {}
    if trust.get("digest") != cand.digest or sha256_file(device, trust["size"]) != trust["sha256"]:
        raise AgentError(WRITE_FAILED, f"slot {slot} no longer matches its verification record")
    name = boot.add_trial_entry(cls=new_release.cls, version=cand.version, slot=slot,
                                tries=new_release.boot_tries, kargs=kargs)
    state.journal("entry", entry=name, bootId=read_boot_id(config))
    # Space: the unpacked tree and the erofs image go; the layout keeps the running and new images.
    shutil.rmtree(paths.tree, ignore_errors=True)
    paths.image.unlink(missing_ok=True)
    gc_layout(paths.layout, [oci_ref_name(release.version), ref])


def failed(config: Config, state: State, cand: Candidate, exc: AgentError) -> None:
    """Record a failed update. Out of space, the unpacked tree and the erofs image go first
    (the device needs its data partition more than a half-done update; the downloaded blobs
    stay, so a retry fetches only what is missing) and the message says how much is free."""
    if exc.code == NO_SPACE:
        paths = work_paths(config)
        shutil.rmtree(paths.tree, ignore_errors=True)
        with contextlib.suppress(OSError):
            paths.image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(config.work_dir if config.work_dir.exists() else config.state_dir).free
            exc.message += (f" ({config.work_dir} is on a full filesystem; {free / 2**20:.0f} MiB free after "
                            "removing the unpacked update; free space there and run `kiln-agent update` again)")
            exc.args = (exc.message,)
    state.finish("failed", version=cand.version, code=exc.code, reason=exc.message)


def finish_install(config: Config, state: State, reboot: bool) -> int:
    pending = state.pending or {}
    state.finish("installed", version=pending.get("version"), slot=pending.get("slot"), entry=pending.get("entry"))
    log(f"installed {pending.get('version')} in slot {pending.get('slot')} as {pending.get('entry')}")
    if reboot:
        log("rebooting into it")
        run(list(config.reboot_command), what="rebooting", code=INTERNAL, capture=False)
    else:
        log("not rebooting (--no-reboot): the new slot boots on the next reboot")
    return OK


# --- boot reconciliation -------------------------------------------------------------------


NO_TRIAL_JOURNAL = ("the new slot never got as far as writing a journal (its kernel or initramfs failed: "
                    "boot counting used up its tries)")


def previous_journal_boot(tool: str) -> str | None:
    """The boot id (32 hex digits) of the boot before this one in the journal, if any."""
    try:
        proc = subprocess.run([tool, "-b", "-1", "--no-pager", "-o", "json", "-n", "1", "--output-fields=_BOOT_ID"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        return str(json.loads(proc.stdout.decode().splitlines()[-1])["_BOOT_ID"]) if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError, TypeError):
        return None


def failed_boot_reason(installed_in: str | None = None) -> str:
    """What the journal of the previous boot says about why it did not stick. `installed_in` is
    the boot id of the boot that installed the update: when that is still the previous boot in
    the journal, the trial boots never reached userspace."""
    tool = shutil.which("journalctl")
    if tool is None:
        return "unknown (no journalctl)"
    previous = previous_journal_boot(tool)
    if installed_in and previous and previous == installed_in.replace("-", ""):
        return NO_TRIAL_JOURNAL
    # The health checks' own words first, then any error of that boot. Needs a persistent
    # journal (/var/log/journal on the data partition).
    queries = (["-u", "kiln-health-*", "-p", "warning"], ["-p", "err"])
    for query in queries:
        try:
            proc = subprocess.run([tool, "-b", "-1", "--no-pager", "-o", "cat", "-n", "15", *query],
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            return "unknown (journalctl timed out)"
        if proc.returncode != 0:
            return ("the new slot never finished booting (no journal of the previous boot: the kernel or "
                    "initramfs failed before the journal was persisted)")
        lines = [ln for ln in proc.stdout.decode(errors="replace").splitlines() if ln.strip()]
        if lines:
            return "; ".join(lines[-6:])
    return "the previous boot logged no errors (the health checks did not complete)"


def cmd_boot(config: Config, release: Release, state: State, boot: BootControl) -> str:
    """Reconcile the state with the slot we booted. Returns what happened (for the log)."""
    pending = state.pending
    booted = boot.booted_slot()
    if booted is not None:
        trusted = state.trust(booted)
        if not trusted or trusted.get("version") != release.version:
            # The running slot is known-good by definition (we booted it); record it so status has it.
            state.set_trust(booted, {"version": release.version, "running": True, "verified": now()})
            state.save()
    if not pending or pending.get("phase") != "entry":
        if pending:
            return f"an update to {pending.get('version')} was interrupted after {pending.get('phase')}; " \
                   "`kiln-agent update` resumes it"
        return f"running {release.version} from slot {booted}"
    slot, version = pending["slot"], pending["version"]
    if pending.get("bootId") and pending.get("bootId") == read_boot_id(config):
        return f"{version} is installed in slot {slot}; it boots on the next reboot"
    if booted == slot and release.version == version:
        entry = next((e for e in boot.entries() if e.slot == slot and e.version == version), None)
        if entry is not None and entry.blessed:
            state.data["pending"] = None
            state.finish("success", version=version, slot=slot, previous=pending.get("from"))
            return f"{version} booted from slot {slot} and was blessed: update complete"
        return f"trial boot of {version} in slot {slot} (entry {entry.name if entry else '?'}): " \
               "waiting for the health checks to bless it"
    reason = failed_boot_reason(pending.get("bootId"))
    event = {"version": version, "digest": pending.get("digest"), "slot": slot, "time": now(),
             "backTo": release.version, "bootedSlot": booted, "reason": reason}
    state.data["rollbacks"] = ([*state.data.get("rollbacks", []), event])[-MAX_ROLLBACKS:]
    for item in (version, pending.get("digest")):
        if item and item not in state.data["blocklist"]:
            state.data["blocklist"].append(item)
    state.data["pending"] = None
    state.set_trust(slot, None)
    removed = boot.remove_slot_entries(slot)
    state.finish("rolled-back", version=version, slot=slot, reason=reason, removedEntries=removed)
    return f"{version} in slot {slot} did not stick; back on {release.version} (slot {booted}): {reason}"


# --- status, self-test --------------------------------------------------------------------------


def status_data(config: Config, release: Release, state: State, boot: BootControl) -> dict[str, Any]:
    return {
        "class": release.cls, "compatible": release.compatible, "version": release.version,
        "bootedSlot": boot.booted_slot(), "selectedEntry": boot.selected_entry(), "bootControl": boot.name,
        "channel": config.channel, "source": config.source if config.registry else None,
        "pending": state.pending, "lastResult": state.data.get("lastResult"),
        "rollbacks": state.data.get("rollbacks", []), "blocklist": blocklist(state),
        "slots": state.data.get("slots", {}), "entries": [e.name for e in boot.entries()],
    }


def render_status(data: dict[str, Any]) -> str:
    lines = [f"{data['class']} {data['version']} from slot {data['bootedSlot'] or '?'} "
             f"(entry {data['selectedEntry'] or '?'}, {data['bootControl']})",
             f"channel {data['channel']} at {data['source'] or '(no registry configured)'}"]
    pending = data["pending"]
    if pending:
        lines.append(f"pending: {pending['version']} -> slot {pending['slot']}, phase {pending['phase']}")
    last = data["lastResult"]
    if last:
        lines.append(f"last result: {last['result']} {last.get('version') or ''} at {last['time']}"
                     + (f": {last['reason']}" if last.get("reason") else ""))
    for rb in data["rollbacks"][-5:]:
        lines.append(f"rollback: {rb['version']} (slot {rb['slot']}) at {rb['time']}: {rb['reason']}")
    if data["blocklist"]:
        lines.append("blocklisted: " + ", ".join(v for v in data["blocklist"] if not v.startswith("sha256:")))
    return "\n".join(lines)


def cmd_self_test(config: Config, release: Release) -> list[str]:
    problems = []
    for tool in ("skopeo", "umoci", "mkfs.erofs"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            problems.append(f"{tool} is not installed")
    if not config.policy.is_file():
        problems.append(f"{config.policy} is missing")
    else:
        try:
            policy = read_json(config.policy)
            for req in (policy.get("transports", {}).get("docker", {}) or {}).values():
                for rule in req:
                    key = rule.get("keyPath")
                    if key and not Path(key).is_file():
                        problems.append(f"policy key {key} is missing")
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"{config.policy}: {exc}")
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(config.state_dir / ".self-test", b"ok\n")
        (config.state_dir / ".self-test").unlink()
    except OSError as exc:
        problems.append(f"state directory {config.state_dir} is not writable: {exc}")
    if not (config.esp / "loader").is_dir():
        problems.append(f"the ESP is not mounted at {config.esp} (no loader/ directory)")
    return problems


# --- command line ---------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"kiln-agent: {message}", file=sys.stderr)
        sys.exit(USAGE)


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kiln-agent", description=__doc__.split("\n\n")[0] if __doc__ else None,
                    epilog=__doc__.split("Exit codes:", 1)[1].join(["Exit codes:", ""]) if __doc__ else None,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV), help="extra config file (highest priority)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    check = sub.add_parser("check", help="decide whether the channel's release should be taken")
    check.add_argument("--json", action="store_true")
    update = sub.add_parser("update", help="download, verify and install the channel's release")
    update.add_argument("--no-reboot", action="store_true", help="install, but do not reboot")
    status = sub.add_parser("status", help="booted slot, version, pending update, rollbacks")
    status.add_argument("--json", action="store_true")
    sub.add_parser("boot", help="on-boot reconciliation (run by kiln-agent-boot.service)")
    sub.add_parser("self-test", help="health check: the agent can run (kiln-health-agent.service)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return dispatch(args)
    except AgentError as exc:
        log(f"error: {exc.message}")
        return exc.code
    except NotImplementedError as exc:
        log(f"error: {exc}")
        return CONFIG
    except OSError as exc:
        log(f"error: {exc}")
        return NO_SPACE if exc.errno == errno.ENOSPC else WRITE_FAILED


def dispatch(args: argparse.Namespace) -> int:
    config, release = load_config(args.config)
    if args.command == "self-test":
        problems = cmd_self_test(config, release)
        for p in problems:
            log(f"self-test: {p}")
        return CONFIG if problems else OK
    state_path = config.state_dir / "state.json"
    if args.command == "status":
        boot = make_boot_control(config, read_boot_control(config))
        data = status_data(config, release, State(state_path), boot)
        print(json.dumps(data, indent=2, sort_keys=True) if args.json else render_status(data))
        return OK
    with locked(config.state_dir):
        state = State(state_path)
        boot = make_boot_control(config, read_boot_control(config))
        if args.command == "boot":
            log(cmd_boot(config, release, state, boot))
            return OK
        cmd_boot(config, release, state, boot)  # a check or update first settles the last boot
        if args.command == "check":
            decision, cand = cmd_check(config, release, state)
            if args.json:
                print(json.dumps({"code": decision.code, "take": decision.take, "reason": decision.reason,
                                  "candidate": cand.__dict__}, indent=2, sort_keys=True))
            else:
                print(f"{'update available' if decision.take else 'no update'}: {decision.reason}")
            return decision.code
        return cmd_update(config, release, state, boot, reboot=not args.no_reboot)


def read_boot_control(config: Config) -> str:
    try:
        return str(read_json(config.release).get("bootControl") or "systemd-boot")
    except (OSError, ValueError):
        return "systemd-boot"


if __name__ == "__main__":
    sys.exit(main())
