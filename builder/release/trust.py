"""Trusted release channels: a TUF repository (python-tuf, the reference implementation) that
names, per class and channel, every release a device may install.

    keys = make_trust_keys(key_dir)                       # kiln keys init: root, targets, online
    repo = Repository(lookaside_dir / "tuf", keys)        # served beside the signatures
    repo.publish(Release(cls, channel, version, digest, length, compatible, min_version))
    repo.withdraw(cls, channel, version, reason)          # kiln channel withdraw
    repo.refresh()                                        # kiln channel refresh: new timestamp/snapshot
    repo.rotate("targets", new_key_dir)                   # kiln channel rotate: root N+1

Roles (docs/ota.md has the table): root (kept offline: signs which keys hold every role),
targets (the release key's TUF half: signs the releases), snapshot and timestamp (the online
key: short expiry, re-signed by `kiln channel refresh` from CI or a timer). A target's path is
`<class>/<channel>/<version>`; its length and sha256 are those of the image's OCI manifest, so
the digest a device pulls by is the one targets signed; `custom` carries the version,
`compatible`, `minVersion` and, once withdrawn, `withdrawn: {reason, time}`.

The repository is a directory of static files (consistent snapshots: N.root.json,
N.targets.json, N.snapshot.json, timestamp.json) under the lookaside directory, so the HTTP
server that already serves image signatures to devices serves it too: a device needs one
more URL path, not one more service, and TUF's guarantees do not depend on that server
(everything it serves is signed, versioned and expiring). OCI artifacts in the registry were
the alternative; Debian's registry (distribution 2.8) has no referrers API, and a device
would need a second client for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    SPECIFICATION_VERSION,
    TOP_LEVEL_ROLE_NAMES,
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from builder.core.errors import UsageError
from builder.keys.root_keys import RootKeys
from builder.keys.tuf_keys import TUF_DIR, TrustKeys, expiry, sign_check, trust_root, write_bytes_atomic
from kiln_device import channel as ch
from kiln_device import contract
from kiln_device.channel import rollout_path, target_path
from kiln_device.typed import dump

ROLLOUT_ROLE = "rollout"
ROLLOUT_PATHS = ["*/*/rollout"]
DEVICE_ROOT = contract.TRUST_ROOT  # the image's trust anchor


# --- releases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    cls: str
    channel: str
    version: str
    digest: str  # sha256:<hex> of the OCI manifest
    length: int  # the manifest's size in bytes
    compatible: str
    min_version: str | None = None
    repository: str | None = None

    @property
    def path(self) -> str:
        return target_path(self.cls, self.channel, self.version)


def delegate_rollout(targets: Targets, signer: Signer) -> None:
    """Targets delegates <class>/<channel>/rollout to the rollout key (terminating: nothing below it)."""
    key = signer.public_key
    role = (targets.delegations.roles or {}).get(ROLLOUT_ROLE) if targets.delegations else None
    if role is not None and role.keyids == [key.keyid]:
        return
    targets.delegations = Delegations(keys={key.keyid: key}, roles={ROLLOUT_ROLE: DelegatedRole(
        name=ROLLOUT_ROLE, keyids=[key.keyid], threshold=1, terminating=True, paths=list(ROLLOUT_PATHS))})



# --- the repository ---------------------------------------------------------------------------


class Repository:
    """The TUF repository in DIR/metadata (consistent snapshots), signed with KEYS."""

    def __init__(self, directory: Path, keys: TrustKeys) -> None:
        self.dir = directory
        self.meta_dir = directory / "metadata"
        self.keys = keys
        self.serializer = JSONSerializer(compact=False)

    # reading

    def exists(self) -> bool:
        return (self.meta_dir / "1.root.json").is_file()

    def has(self, role: str) -> bool:
        return any(self.meta_dir.glob(f"*.{role}.json"))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time: `kiln release`, `kiln channel`, `kiln rollout` and the fleet service's
        automatic halt all re-sign snapshot and timestamp."""
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def latest(self, role: str) -> Metadata[Any]:
        if role == "timestamp":
            return Metadata.from_file(str(self.meta_dir / "timestamp.json"))
        versions = sorted(int(p.name.split(".", 1)[0]) for p in self.meta_dir.glob(f"*.{role}.json"))
        if not versions:
            raise UsageError(f"{self.dir}: no {role} metadata; run `kiln channel init` first")
        return Metadata.from_file(str(self.meta_dir / f"{versions[-1]}.{role}.json"))

    def root_bytes(self, version: int | None = None) -> bytes:
        """A root (the newest by default): what an image bakes as its trust anchor."""
        n = version or self.latest("root").signed.version
        return (self.meta_dir / f"{n}.root.json").read_bytes()

    # writing

    def _write(self, md: Metadata[Any], role: str) -> None:
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        path = self.meta_dir / name
        if role != "timestamp" and path.exists():
            raise UsageError(f"{path} exists: metadata versions, once published, never change")
        write_bytes_atomic(path, md.to_bytes(self.serializer))

    def _sign(self, md: Metadata[Any], role: str) -> Metadata[Any]:
        md.signatures.clear()
        md.sign(self.keys.for_role(role), append=False)
        return md

    def init(self, root: bytes) -> None:
        """Root v1 (ROOT: the key directory's, which images bake), an empty targets, snapshot and timestamp."""
        if self.exists():
            raise UsageError(f"{self.meta_dir} already holds a TUF repository")
        md: Metadata[Root] = Metadata.from_bytes(root)
        if md.signed.version != 1:
            raise UsageError(f"a new repository starts from root version 1, not {md.signed.version}")
        md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
        self._write(md, "root")
        self._write(self._sign(Metadata(Targets(expires=expiry("targets"))), "targets"), "targets")
        self._snapshot_and_timestamp()

    def _snapshot_and_timestamp(self) -> None:
        targets = self.latest("targets").signed
        snap: Metadata[Snapshot]
        try:
            snap = self.latest("snapshot")
            snap.signed.version += 1
        except UsageError:
            snap = Metadata(Snapshot(expires=expiry("snapshot")))
        snap.signed.meta["targets.json"] = MetaFile(version=targets.version)
        if self.has(ROLLOUT_ROLE):
            snap.signed.meta[f"{ROLLOUT_ROLE}.json"] = MetaFile(version=self.latest(ROLLOUT_ROLE).signed.version)
        snap.signed.expires = expiry("snapshot")
        self._write(self._sign(snap, "snapshot"), "snapshot")
        ts: Metadata[Timestamp]
        if (self.meta_dir / "timestamp.json").exists():
            ts = self.latest("timestamp")
            ts.signed.version += 1
        else:
            ts = Metadata(Timestamp(expires=expiry("timestamp")))
        ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
        ts.signed.expires = expiry("timestamp")
        self._write(self._sign(ts, "timestamp"), "timestamp")

    def _update_targets(self, change: Any) -> Metadata[Targets]:
        with self.locked():
            md: Metadata[Targets] = self.latest("targets")
            change(md.signed)
            if "rollout" in self.keys.signers:
                delegate_rollout(md.signed, self.keys.signers["rollout"])
                if not self.has(ROLLOUT_ROLE):  # a delegated role must be in the snapshot: an empty one first
                    empty = Metadata(Targets(expires=expiry(ROLLOUT_ROLE)))
                    self._write(self._sign(empty, ROLLOUT_ROLE), ROLLOUT_ROLE)
            md.signed.version += 1
            md.signed.expires = expiry("targets")
            self._write(self._sign(md, "targets"), "targets")
            self._snapshot_and_timestamp()
            return md

    # rollouts (the delegated role; kiln_device.fleet says how devices read it)

    def rollout(self, cls: str, channel: str) -> dict[str, Any] | None:
        if not self.has(ROLLOUT_ROLE):
            return None
        target = self.latest(ROLLOUT_ROLE).signed.targets.get(rollout_path(cls, channel))
        return dict(target.unrecognized_fields.get("custom") or {}) if target is not None else None

    def update_rollout(self, cls: str, channel: str,
                       change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Read CLASS/CHANNEL's rollout, CHANGE it and sign the result, all under the repository's lock (the
        service's automatic halt and `kiln rollout` or `kiln release` never undo each other). CHANGE returns
        None to leave it as it is. Returns the state in force."""
        with self.locked():
            current = self.rollout(cls, channel)
            new = change(current)
            if new is None:
                return current
            self._sign_rollout(cls, channel, new)
            return new

    def set_rollout(self, cls: str, channel: str, state: dict[str, Any]) -> int:
        """Sign STATE as CLASS/CHANNEL's rollout (rollout key), then snapshot and timestamp (online key).
        Returns the rollout role's new version."""
        with self.locked():
            return self._sign_rollout(cls, channel, state)

    def _sign_rollout(self, cls: str, channel: str, state: dict[str, Any]) -> int:
        ch.parse_rollout(state, f"the rollout of {cls} on {channel}")  # what devices will read it as
        targets = self.latest("targets").signed
        if targets.delegations is None or ROLLOUT_ROLE not in (targets.delegations.roles or {}):
            raise UsageError(f"{self.dir}: targets delegates no rollout role yet; release once with a key "
                             "directory that has tuf/rollout.pem (`kiln keys init` adds it)")
        md: Metadata[Targets]
        if self.has(ROLLOUT_ROLE):
            md = self.latest(ROLLOUT_ROLE)
            md.signed.version += 1
        else:
            md = Metadata(Targets(expires=expiry(ROLLOUT_ROLE)))
        body = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
        path = rollout_path(cls, channel)
        md.signed.targets[path] = TargetFile(length=len(body), hashes={"sha256": hashlib.sha256(body).hexdigest()},
                                             path=path, unrecognized_fields={"custom": state})
        md.signed.expires = expiry(ROLLOUT_ROLE)
        self._write(self._sign(md, ROLLOUT_ROLE), ROLLOUT_ROLE)
        self._snapshot_and_timestamp()
        return md.signed.version

    def publish(self, release: Release) -> None:
        def add(targets: Targets) -> None:
            old = targets.targets.get(release.path)
            if old is not None and old.hashes.get("sha256") != release.digest.removeprefix("sha256:"):
                raise UsageError(f"{release.cls} {release.version} is already released on {release.channel} as "
                                 f"sha256:{old.hashes.get('sha256')}; a released version never changes digest",
                                 hint="release the fix under a new version")
            custom = dump(ch.TargetCustom(
                version=release.version, compatible=release.compatible, min_version=release.min_version or "",
                repository=release.repository or ""))
            targets.targets[release.path] = TargetFile(
                length=release.length, hashes={"sha256": release.digest.removeprefix("sha256:")},
                path=release.path, unrecognized_fields={"custom": custom})

        self._update_targets(add)

    def withdraw(self, cls: str, channel: str, version: str, reason: str) -> None:
        path = target_path(cls, channel, version)

        def mark(targets: Targets) -> None:
            target = targets.targets.get(path)
            if target is None:
                raise UsageError(f"{cls} {version} was never released on {channel}",
                                 hint=f"`kiln channel status {cls}` lists the releases")
            raw = dict(target.unrecognized_fields.get("custom") or {})
            try:
                custom = ch.parse_target_custom(raw, f"the target {path}")
            except contract.ContractError as exc:
                raise UsageError(f"the channel's metadata: {exc}") from None
            if custom.withdrawn is not None:
                raise UsageError(f"{cls} {version} on {channel} is already withdrawn ({custom.withdrawn.reason})")
            withdrawn = ch.Withdrawn(reason=reason, time=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            # what a later Kiln added stays as it was
            target.unrecognized_fields["custom"] = {**raw, **dump(replace(custom, withdrawn=withdrawn))}

        self._update_targets(mark)

    def refresh(self, *, targets: bool = False) -> None:
        """New snapshot and timestamp (and targets, re-signed, with --targets; and the rollout role's metadata
        when the rollout key is at hand) with fresh expiry dates."""
        if targets:
            self._update_targets(lambda _t: None)
        with self.locked():
            # The rollout role's metadata expires too (30 days): re-signed here when its key is at hand.
            if "rollout" in self.keys.signers and self.has(ROLLOUT_ROLE):
                md: Metadata[Targets] = self.latest(ROLLOUT_ROLE)
                md.signed.version += 1
                md.signed.expires = expiry(ROLLOUT_ROLE)
                self._write(self._sign(md, ROLLOUT_ROLE), ROLLOUT_ROLE)
            if not targets or "rollout" in self.keys.signers:
                self._snapshot_and_timestamp()

    def rotate(self, role: str, new_keys: TrustKeys) -> int:
        """Root N+1 naming NEW_KEYS' key for ROLE ('root', 'targets' or 'online'); signed by the
        threshold of root N's keys (and, for a root rotation, of the new root's too: NEW_KEYS' roots, or its
        tuf/root.pem). Returns the new root version. A leaked online key is one rotation: root N+1 names the
        new key, and snapshot and timestamp are signed again with it, so what the old key signs is refused."""
        roles = {"root": ("root",), "targets": ("targets",), "online": ("snapshot", "timestamp")}[role]
        md: Metadata[Root] = self.latest("root")
        previous = Metadata[Root].from_bytes(md.to_bytes()).signed
        root = md.signed
        if role == "root":
            for keyid in list(root.roles["root"].keyids):
                root.revoke_key(keyid, "root")
            for key in new_keys.root_keys():
                root.add_key(key, "root")
            root.roles["root"].threshold = new_keys.root_threshold()
        for name in roles if role != "root" else ():
            for keyid in list(root.roles[name].keyids):
                root.revoke_key(keyid, name)
            root.add_key(new_keys.signers[role].public_key, name)
        root.version += 1
        root.expires = expiry("root")
        if self.keys.roots is not None:
            self.keys.roots.check_threshold(f"root v{root.version}")
        md.signatures.clear()
        for signer in self.keys.root_signers():
            md.sign(signer, append=True)
        if role == "root":  # both roots sign a root rotation: the old one's threshold and the new one's
            for signer in new_keys.root_signers():
                md.sign(signer, append=True)
        sign_check(md, previous)  # as a device checks root N+1: with root N's threshold and its own
        self._write(md, "root")
        if role == "root":
            self.keys = TrustKeys(self.keys.signers, new_keys.roots) if new_keys.roots else \
                TrustKeys({**self.keys.signers, "root": new_keys.signers["root"]})
        else:
            self.keys = TrustKeys({**self.keys.signers, role: new_keys.signers[role]}, self.keys.roots)
        if role == "targets":
            self._update_targets(lambda _t: None)
        elif role == "online":
            self._snapshot_and_timestamp()
        return root.version

    # reporting

    def status(self, cls: str | None = None) -> dict[str, Any]:
        targets = self.latest("targets").signed
        releases = []
        for path, target in sorted(targets.targets.items()):
            c, channel, version = path.split("/", 2)
            if cls and c != cls:
                continue
            custom = target.unrecognized_fields.get("custom") or {}
            releases.append({"class": c, "channel": channel, "version": version,
                             "digest": "sha256:" + target.hashes["sha256"], "compatible": custom.get("compatible"),
                             "withdrawn": custom.get("withdrawn")})
        roles = {role: {"version": self.latest(role).signed.version,
                        "expires": self.latest(role).signed.expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
                 for role in TOP_LEVEL_ROLE_NAMES}
        return {"repository": str(self.dir), "spec": SPECIFICATION_VERSION, "roles": roles, "releases": releases}


def open_repository(lookaside_dir: Path, key_dir: Path | None, *, with_root: bool = False,
                    roots: RootKeys | None = None) -> Repository:
    """The repository under LOOKASIDE_DIR/tuf, signing with KEY_DIR's keys (none: read only) and ROOTS'."""
    keys = TrustKeys.load(key_dir, with_root=with_root, roots=roots) if key_dir is not None else TrustKeys({}, roots)
    return Repository(lookaside_dir / TUF_DIR, keys)


def publish_release(lookaside_dir: Path, key_dir: Path, release: Release) -> Repository:
    """Name RELEASE in the channel (`kiln release`), making the repository on the first release."""
    repo = open_repository(lookaside_dir, key_dir)
    if not repo.exists():
        root = trust_root(key_dir)
        assert root is not None
        repo.init(root)
    repo.publish(release)
    return repo
