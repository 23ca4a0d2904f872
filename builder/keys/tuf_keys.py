"""The TUF keys of a key directory: root, targets, online (snapshot and timestamp) and rollout, and root v1.

    keys = make_trust_keys(key_dir, roots=roots)    # kiln keys init --root R: the keys and KEY_DIR/tuf/root.json
    signers = TrustKeys.load(key_dir, with_root=False)
    trust_root(key_dir)                             # the root.json images bake as their trust anchor

The repository these keys sign is builder.release.trust's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import Key, Signer
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    Root,
)
from tuf.api.serialization.json import JSONSerializer

from builder.core.errors import UsageError
from builder.keys.root_keys import RootKeys
from builder.keys.signer import load_signer

TUF_DIR = "tuf"  # in a key directory: the private keys; in the lookaside directory: the repository
KEY_FILES = {"root": "root.pem", "targets": "targets.pem", "online": "online.pem", "rollout": "rollout.pem"}
ROLE_KEY = {"root": "root", "targets": "targets", "snapshot": "online", "timestamp": "online", "rollout": "rollout"}
DEFAULT_EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90),
                  "snapshot": timedelta(days=7), "timestamp": timedelta(days=1), "rollout": timedelta(days=90)}
# The delegated role that signs each channel's rollout state (waves, halt): targets delegates the paths
# <class>/<channel>/rollout to it, so its key (held by `kiln fleet serve` for the automatic halt) can open,
# halt and resume rollouts of what targets released, and never name an image.
EXPIRY_ENV = "KILN_TUF_EXPIRY"  # role=seconds,...: shorter lives (tests, a drill)


ROOT_FILE = "root.json"  # in KEY_DIR/tuf: the newest root, what images bake as their trust anchor


def has_trust_keys(key_dir: Path) -> bool:
    """The keys a release needs (targets, online) and the root images bake; the root key may be offline."""
    return all((key_dir / TUF_DIR / f).is_file() for f in (KEY_FILES["targets"], KEY_FILES["online"], ROOT_FILE))


def trust_root(key_dir: Path) -> bytes | None:
    """The root an image built with KEY_DIR trusts (None: a key directory from before trusted channels)."""
    path = key_dir / TUF_DIR / ROOT_FILE
    return path.read_bytes() if path.is_file() else None


def make_trust_keys(key_dir: Path, passphrase: str | None = None, *, roots: RootKeys | None = None) -> dict[str, Path]:
    """Create the ed25519 keys under KEY_DIR/tuf/ (mode 0600; encrypted with PASSPHRASE, the release key's,
    when there is one) and root v1 (KEY_DIR/tuf/root.json) unless they exist; the key paths. ROOTS: the offline
    root (builder.keys.root_keys), whose keys and threshold root v1 names and whose keys at hand sign it;
    without, a root key of its own in KEY_DIR/tuf/root.pem (development and test keys; never exported)."""
    d = key_dir / TUF_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = {}
    for name, file in KEY_FILES.items():  # an older key directory gains the keys it lacks (rollout)
        if name == "root" and (roots is not None or (d / ROOT_FILE).exists()):
            continue  # an offline root; or a root.json already made (its key may be offline)
        path = d / file
        if not path.exists():
            make_key_file(path, passphrase)
        made[name] = path
    root_file = d / ROOT_FILE
    if not root_file.exists():
        keys = TrustKeys.load(key_dir, roots=roots)
        root = Root(expires=expiry("root"), consistent_snapshot=True)
        for role in TOP_LEVEL_ROLE_NAMES:
            if role != "root":
                root.add_key(keys.for_role(role).public_key, role)
        for key in keys.root_keys():
            root.add_key(key, "root")
        root.roles["root"].threshold = keys.root_threshold()
        md = Metadata(root)
        sign_root(md, keys, None)
        write_bytes_atomic(root_file, md.to_bytes(JSONSerializer(compact=False)))
    return made


def make_key_file(path: Path, passphrase: str | None = None, *, from_env: bool = False) -> None:
    """A new ed25519 key at PATH (0600, never over an existing file), encrypted with PASSPHRASE (FROM_ENV: the
    release key's, from the environment) when there is one."""
    if from_env:
        from builder.core.secrets import key_passphrase

        passphrase = key_passphrase()
    protect = serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else \
        serialization.NoEncryption()
    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     protect)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def sign_root(md: Metadata[Root], keys: TrustKeys, previous: Root | None) -> None:
    """Sign root MD with every root key at hand; UsageError unless it verifies with its own root role's threshold
    and, for root N+1, with PREVIOUS's (what a device checks before it trusts N+1)."""
    if keys.roots is not None:
        keys.roots.check_threshold(f"root v{md.signed.version}")
    md.signatures.clear()
    for signer in keys.root_signers():
        md.sign(signer, append=True)
    sign_check(md, previous)


def sign_check(md: Metadata[Root], previous: Root | None) -> None:
    """UsageError unless root MD verifies with its own root role and with PREVIOUS's (root N, for N+1)."""
    from tuf.api.exceptions import UnsignedMetadataError

    for name, trusted in (("itself", md.signed), (f"root v{previous.version if previous else 0}", previous)):
        if trusted is None:
            continue
        try:
            trusted.verify_delegate("root", md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            need = trusted.roles["root"].threshold
            raise UsageError(f"root v{md.signed.version} is not signed by {need} of the root keys {name} names "
                             f"({len(md.signatures)} signature(s) given)",
                             hint="give each holder's root directory with --root DIR (repeat it)") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrustKeys:
    """Signers for the roles this run may sign; the root's only when they are at hand: the offline root's keys
    (ROOTS, builder.keys.root_keys), or a development key directory's own tuf/root.pem."""

    signers: dict[str, Signer]
    roots: RootKeys | None = None

    @classmethod
    def load(cls, key_dir: Path, *, with_root: bool = True, only: tuple[str, ...] | None = None,
             roots: RootKeys | None = None) -> TrustKeys:
        """The keys of KEY_DIR/tuf; ONLY: just those (the fleet service holds rollout and online). The
        rollout key is optional (a key directory from before rollouts has none until `kiln keys init`), and so is
        the root key (an offline root is never in KEY_DIR)."""
        names = {k: v for k, v in KEY_FILES.items() if (with_root or k != "root") and (only is None or k in only)}
        optional = {"rollout", "root"} if only is None else set()
        return cls({name: load_signer(key_dir / TUF_DIR / file) for name, file in names.items()
                    if name not in optional or (key_dir / TUF_DIR / file).is_file()}, roots)

    def for_role(self, role: str) -> Signer:
        if role == "root":
            return self.root_signers()[0]
        key = ROLE_KEY[role]
        if key not in self.signers:
            raise UsageError(f"signing {role} metadata needs the {key} key, which this run was not given")
        return self.signers[key]

    def root_signers(self) -> list[Signer]:
        if self.roots is not None:
            return list(self.roots.signers)
        if "root" in self.signers:
            return [self.signers["root"]]
        raise UsageError("signing root metadata needs the root keys, which this run was not given",
                         hint="give each holder's root directory with --root DIR (kiln keys root init)")

    def root_keys(self) -> list[Key]:
        """The public keys a root names for the root role."""
        if self.roots is not None:
            return list(self.roots.keys)
        return [s.public_key for s in self.root_signers()]

    def root_threshold(self) -> int:
        return self.roots.threshold if self.roots is not None else 1


def expiry(role: str, now: datetime | None = None) -> datetime:
    lives = dict(DEFAULT_EXPIRY)
    for item in filter(None, os.environ.get(EXPIRY_ENV, "").split(",")):
        name, _, seconds = item.partition("=")
        if name not in lives or not seconds.isdigit():
            raise UsageError(f"${EXPIRY_ENV}: {item!r}: expected ROLE=SECONDS with ROLE one of {', '.join(lives)}")
        lives[name] = timedelta(seconds=int(seconds))
    return ((now or datetime.now(UTC)) + lives[role]).replace(microsecond=0)


