"""The TUF keys of a key directory: root, targets, online (snapshot and timestamp) and rollout, and root v1.

    keys = make_trust_keys(key_dir)                 # kiln keys init: the keys and KEY_DIR/tuf/root.json
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
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    Root,
)
from tuf.api.serialization.json import JSONSerializer

from builder.core.errors import UsageError

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


def make_trust_keys(key_dir: Path, passphrase: str | None = None) -> dict[str, Path]:
    """Create the ed25519 keys under KEY_DIR/tuf/ (mode 0600; encrypted with PASSPHRASE, the release key's,
    when there is one) and root v1 (KEY_DIR/tuf/root.json), signed by the root key, unless they exist; the
    key paths."""
    d = key_dir / TUF_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = {}
    for name, file in KEY_FILES.items():  # an older key directory gains the keys it lacks (rollout)
        path = d / file
        if not path.exists():
            protect = serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else \
                serialization.NoEncryption()
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, protect)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
        made[name] = path
    root_file = d / ROOT_FILE
    if not root_file.exists():
        keys = TrustKeys.load(key_dir)
        root = Root(expires=expiry("root"), consistent_snapshot=True)
        for role in TOP_LEVEL_ROLE_NAMES:
            root.add_key(keys.for_role(role).public_key, role)
        md = Metadata(root)
        md.sign(keys.for_role("root"))
        write_bytes_atomic(root_file, md.to_bytes(JSONSerializer(compact=False)))
    return made


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_signer(path: Path) -> CryptoSigner:
    from builder.core.secrets import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV, key_passphrase

    try:
        data = path.read_bytes()
        encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
        phrase = key_passphrase() if encrypted else None
        if encrypted and phrase is None:
            raise UsageError(f"{path}: the key is protected by the release key's passphrase: set "
                             f"${PASSPHRASE_FILE_ENV} (a file) or ${PASSPHRASE_ENV}")
        private = serialization.load_pem_private_key(data, password=phrase.encode() if phrase else None)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such key; run `kiln keys init {path.parent.parent}` first") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        hint = " (is the passphrase right?)" if b"ENCRYPTED" in path.read_bytes()[:64] else ""
        raise UsageError(f"{path}: the PEM private key does not load{hint}: {exc}") from None
    return CryptoSigner(private)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrustKeys:
    """Signers for the roles this run may sign (root only when the offline key is at hand)."""

    signers: dict[str, Signer]

    @classmethod
    def load(cls, key_dir: Path, *, with_root: bool = True, only: tuple[str, ...] | None = None) -> TrustKeys:
        """The keys of KEY_DIR/tuf; ONLY: just those (the fleet service holds rollout and online). The
        rollout key is optional: a key directory from before rollouts has none until `kiln keys init`."""
        names = {k: v for k, v in KEY_FILES.items() if (with_root or k != "root") and (only is None or k in only)}
        return cls({name: load_signer(key_dir / TUF_DIR / file) for name, file in names.items()
                    if name != "rollout" or only is not None or (key_dir / TUF_DIR / file).is_file()})

    def for_role(self, role: str) -> Signer:
        key = ROLE_KEY[role]
        if key not in self.signers:
            raise UsageError(f"signing {role} metadata needs the {key} key, which this run was not given")
        return self.signers[key]


def expiry(role: str, now: datetime | None = None) -> datetime:
    lives = dict(DEFAULT_EXPIRY)
    for item in filter(None, os.environ.get(EXPIRY_ENV, "").split(",")):
        name, _, seconds = item.partition("=")
        if name not in lives or not seconds.isdigit():
            raise UsageError(f"${EXPIRY_ENV}: {item!r}: expected ROLE=SECONDS with ROLE one of {', '.join(lives)}")
        lives[name] = timedelta(seconds=int(seconds))
    return ((now or datetime.now(UTC)) + lives[role]).replace(microsecond=0)


