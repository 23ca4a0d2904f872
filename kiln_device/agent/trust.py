"""The channel as fresh, verified TUF metadata says it is (python-tuf's ngclient).

An image that carries a TUF root (`/usr/lib/kiln/tuf/root.json`, agent.json `trustRoot`)
installs only a digest that the targets role names under `<class>/<channel>/`, from metadata
that verified and has not expired; the tag in the registry is not consulted. The client's
state (the trusted metadata, the root history) lives in `trustDir` on the data partition: it
survives updates, and ngclient replaces each file atomically, so a power cut in a refresh
leaves the last trusted metadata in force. A root rotation is followed from the server
(N.root.json, each signed by the old and the new root keys): no reflash.

What TUF refuses (ngclient's errors) becomes an exit code: expired metadata is STALE (13,
never "up to date"), a bad signature, a replayed or mixed version or a wrong hash is
SIGNATURE (6), an unreachable server is UNREACHABLE (7). This module imports python-tuf,
which the agent's venv carries; nothing else in kiln_device needs more than the stdlib.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln_device import version as kv
from kiln_device.agent.config import Config
from kiln_device.agent.journal import fault_point
from kiln_device.channel import Rollout, parse_rollout, parse_target_custom, rollout_path
from kiln_device.common import fsync_dir, write_atomic
from kiln_device.contract import (
    CONFIG,
    INCOMPATIBLE,
    SIGNATURE,
    STALE,
    UNREACHABLE,
    ContractError,
    Release,
)
from kiln_device.errors import AgentError, log
from kiln_device.fleet import rollout_gate

METADATA_PATH = "tuf/metadata/"  # under the lookaside URL (builder.release.trust)


@dataclass(frozen=True)
class ChannelRelease:
    version: str
    digest: str
    compatible: str
    min_version: str | None
    withdrawn: dict[str, Any] | None


@dataclass(frozen=True)
class Channel:
    """What verified metadata says about this device's class and channel."""

    cls: str
    channel: str
    releases: tuple[ChannelRelease, ...]
    expires: dict[str, str] = field(default_factory=dict)
    root_version: int = 0
    rollout: Rollout | None = None  # the channel's rollout state (the delegated `rollout` role), if any

    def find(self, version: str) -> ChannelRelease | None:
        return next((r for r in self.releases if r.version == version), None)

    def newest(self, compatible: str) -> ChannelRelease | None:
        """The newest release for COMPATIBLE that is not withdrawn."""
        good = [r for r in self.releases if r.withdrawn is None and r.compatible == compatible]
        return max(good, key=lambda r: kv.Version(r.version)) if good else None

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.cls, "channel": self.channel, "expires": self.expires, "rootVersion": self.root_version,
                "releases": [{"version": r.version, "digest": r.digest, "withdrawn": r.withdrawn}
                             for r in self.releases]}


def enabled(config: Config) -> bool:
    return config.trust_root.is_file()


def read_channel(config: Config, release: Release) -> Channel:
    """Refresh the TUF metadata and return this class's channel; AgentError when it cannot be trusted."""
    try:
        from tuf.api import exceptions as tuf_errors
        from tuf.api.metadata import Metadata, Targets
        from tuf.ngclient import Updater
    except ImportError as exc:
        raise AgentError(CONFIG, f"this image trusts its channel through TUF ({config.trust_root}) but python-tuf "
                                 f"cannot be imported: {exc}") from None
    if not config.lookaside:
        raise AgentError(CONFIG, "no lookaside URL configured: the TUF metadata is served there")
    meta_dir = config.trust_dir / "metadata"
    meta_dir.mkdir(parents=True, exist_ok=True)
    url = f"{config.lookaside.rstrip('/')}/{METADATA_PATH}"
    # The newest root this device trusted (kept here across updates) unless there is none yet, then the
    # image's own. A cached root that does not load (a torn write) is restored from the copy kept of the
    # last trusted root, never replaced by the image's older one: that would trust keys a rotation retired.
    bootstrap = None if (meta_dir / "root.json").exists() else config.trust_root.read_bytes()
    try:
        try:
            updater = Updater(str(meta_dir), url, bootstrap=bootstrap)
        except (tuf_errors.RepositoryError, ValueError, OSError) as exc:
            if bootstrap is not None:
                raise
            restored = restore_root(config.trust_dir, meta_dir)
            if restored is None:
                raise AgentError(SIGNATURE, f"{meta_dir}/root.json does not load ({exc}), and no copy of the last "
                                            "trusted root does: refusing to start again from the image's older root "
                                            "(a rollback of trust). To start over from the image's root, on purpose: "
                                            "kiln-agent trust-reset") from None
            log(f"{meta_dir}/root.json does not load ({exc}); restored the last trusted root, v{restored}, "
                "from its copy")
            updater = Updater(str(meta_dir), url, bootstrap=None)
        updater.refresh()
        fault_point("trust-refreshed")  # new metadata written by ngclient, not yet fsynced: a power cut here
        # The rollout state (waves, halt) is signed by the delegated `rollout` role (builder.release.trust): looked up
        # through the delegation, verified like any target. None: this channel has no rollout yet.
        info = updater.get_targetinfo(rollout_path(release.cls, config.channel))
        rollout = parse_rollout(info.unrecognized_fields.get("custom"), f"the rollout target of {url}") \
            if info is not None else None
    except tuf_errors.ExpiredMetadataError as exc:
        raise AgentError(STALE, f"the channel's metadata from {url} has expired ({exc}): a frozen or stale "
                                "channel is never up to date; nothing is installed until fresh metadata verifies") \
            from None
    except tuf_errors.DownloadLengthMismatchError as exc:  # oversized: what the server sends is refused
        raise AgentError(SIGNATURE, f"the channel's TUF metadata from {url} is refused: {exc}") from None
    except tuf_errors.DownloadError as exc:
        raise AgentError(UNREACHABLE, f"fetching TUF metadata from {url}: {exc}") from None
    except (tuf_errors.RepositoryError, ValueError) as exc:
        raise AgentError(SIGNATURE, f"the channel's TUF metadata from {url} is refused: "
                                    f"{type(exc).__name__}: {exc}") from None
    finally:
        sync(meta_dir)
    # refresh() verified and persisted the top-level targets; read that trusted copy.
    targets: Metadata[Targets] = Metadata.from_file(str(meta_dir / "targets.json"))
    prefix = f"{release.cls}/{config.channel}/"
    releases = []
    for path, target in targets.signed.targets.items():
        if not path.startswith(prefix):
            continue
        version = path[len(prefix):]
        try:
            custom = parse_target_custom(target.unrecognized_fields.get("custom"), f"the target {path}")
        except ContractError as exc:
            log(f"ignoring {exc}")
            continue
        if not kv.is_valid(version) or custom.version != version or "sha256" not in target.hashes:
            log(f"ignoring target {path}: not a Kiln release entry")
            continue
        withdrawn = {"reason": custom.withdrawn.reason, "time": custom.withdrawn.time} if custom.withdrawn else None
        releases.append(ChannelRelease(version=version, digest="sha256:" + target.hashes["sha256"],
                                       compatible=custom.compatible, min_version=custom.min_version or None,
                                       withdrawn=withdrawn))
    expires = {}
    for role in ("root", "timestamp", "snapshot", "targets"):
        try:
            md = Metadata.from_file(str(meta_dir / f"{role}.json"))
            expires[role] = md.signed.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OSError, ValueError):
            pass
    root_version = Metadata.from_file(str(meta_dir / "root.json")).signed.version
    keep_root(config.trust_dir, meta_dir, root_version)
    return Channel(release.cls, config.channel, tuple(releases), expires, root_version, rollout)


def choose(channel: Channel, release: Release, device: str | None = None) -> tuple[ChannelRelease | None, str | None]:
    """The release this device should run: the newest in its channel for its `compatible` that is not
    withdrawn and whose rollout has reached DEVICE's wave (kiln_device.fleet.rollout_gate), and, when
    a newer one waits for a wave or a halted rollout, why; None with the reason when every release
    waits. (decide() then says whether it is newer, allowed by minVersion, not blocklisted.)"""
    best = channel.newest(release.compatible)
    if best is None:
        others = sorted({r.compatible for r in channel.releases} - {release.compatible})
        what = f"only for {', '.join(others)}" if others else "none"
        raise AgentError(INCOMPATIBLE, f"channel {channel.cls}/{channel.channel} names no release compatible "
                                       f"with {release.compatible} that is not withdrawn ({what})")
    if device is None:
        return best, None
    waiting = rollout_gate(device, channel.rollout, best.version)
    if waiting is None:
        return best, None
    # An older release that every wave may take (an earlier rollout, finished) is still an update.
    older = [r for r in channel.releases if r.withdrawn is None and r.compatible == release.compatible
             and r.version != best.version and rollout_gate(device, channel.rollout, r.version) is None]
    if older:
        return max(older, key=lambda r: kv.Version(r.version)), waiting
    return None, waiting


ROOTS_DIR = "roots"  # in trustDir: a copy of each root this device trusted, <N>.root.json, fsynced


def keep_root(trust_dir: Path, meta_dir: Path, version: int) -> None:
    """A durable copy of the root just trusted (what restore_root falls back to; never the image's)."""
    copy = trust_dir / ROOTS_DIR / f"{version}.root.json"
    if copy.is_file():
        return
    copy.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(copy, (meta_dir / "root.json").read_bytes(), 0o644)
    for old in sorted(copy.parent.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]))[:-3]:
        old.unlink(missing_ok=True)  # the newest three are plenty: each was written whole and fsynced


def restore_root(trust_dir: Path, meta_dir: Path) -> int | None:
    """Put the newest intact copy of a trusted root back as META_DIR/root.json; its version (None: no copy loads)."""
    from tuf.api.metadata import Metadata, Root

    copies = sorted((trust_dir / ROOTS_DIR).glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]),
                    reverse=True) if (trust_dir / ROOTS_DIR).is_dir() else []
    for copy in copies:
        try:
            data = copy.read_bytes()
            md: Metadata[Root] = Metadata.from_bytes(data)
            md.signed.verify_delegate("root", md.signed_bytes, md.signatures)  # whole, and signed as it was
        except Exception as exc:  # a torn copy: the next older one
            log(f"{copy} does not load ({type(exc).__name__}); trying an older copy")
            continue
        write_atomic(meta_dir / "root.json", data, 0o644)
        return md.signed.version
    return None


def reset_trust(trust_dir: Path) -> list[Path]:
    """`kiln-agent trust-reset`: forget the trusted metadata and its root copies; the next check starts from the
    image's root. An operator's decision (a torn state that cannot be restored), never the agent's own."""
    import shutil

    gone = [p for p in (trust_dir / "metadata", trust_dir / ROOTS_DIR) if p.exists()]
    for path in gone:
        shutil.rmtree(path)
    return gone


def sync(directory: Path) -> None:
    """Make the metadata ngclient wrote survive a power cut (it replaces files, but does not fsync)."""
    if not directory.is_dir():
        return
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
    fsync_dir(directory)
