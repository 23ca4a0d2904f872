"""The TUF root, kept offline: N root keys of which a threshold must sign (`kiln keys root init`).

    make_root_keys(Path("/media/usb/kiln-root"), count=3, threshold=2)   # root-1.pem .. root-3.pem
    roots = load_root_keys([Path("/media/usb-a"), Path("/media/usb-b")])  # the holders bring theirs

The root signs which keys hold every other role (builder.keys.tuf_keys: targets, online, rollout),
and nothing else. It is made by an explicit command, on a machine of its own, and never travels
with the keys CI or the fleet service hold (`kiln keys export` leaves every root key out). A root
directory holds one or more `root-N.pem` (ed25519, PKCS#8, encrypted with the passphrase from
$KILN_KEY_PASSPHRASE_FILE or $KILN_KEY_PASSPHRASE: a root key without one is refused) and
`root-policy.json`: the threshold and every root key's public half, so that a root can name all N
keys when only the threshold of them is at hand. Copy a `root-N.pem` with `root-policy.json` to
each holder's medium; a ceremony signs with the ones brought (`--root DIR`, repeated).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from builder.core import paths
from builder.core.errors import UsageError
from builder.keys.signer import load_signer

POLICY_FILE = "root-policy.json"
KEY_GLOB = "root-*.pem"
MAX_KEYS = 9


@dataclass(frozen=True)
class RootKeys:
    """The root keys at hand (signers), the threshold, and every root key's public half (keys)."""

    signers: tuple[CryptoSigner, ...]
    threshold: int
    keys: tuple[Key, ...]

    def check_threshold(self, what: str) -> None:
        if len(self.signers) < self.threshold:
            raise UsageError(f"{what} needs {self.threshold} of the {len(self.keys)} root keys' signatures; "
                             f"{len(self.signers)} given",
                             hint="give each holder's root directory with --root DIR (repeat it)")


def make_root_keys(directory: Path, *, count: int, threshold: int, passphrase: str | None) -> list[Path]:
    """COUNT root keys in DIRECTORY (new, outside the project, 0700; each 0600 and encrypted) and its policy."""
    if not 1 <= threshold <= count <= MAX_KEYS:
        raise UsageError(f"--threshold {threshold} of --keys {count}: expected 1 <= threshold <= keys <= {MAX_KEYS}")
    if not passphrase:
        raise UsageError("the root keys need a passphrase: they sign which keys hold every role",
                         hint="set $KILN_KEY_PASSPHRASE_FILE (a file) or $KILN_KEY_PASSPHRASE")
    directory = directory.expanduser().absolute()
    root = paths.project_root().resolve()
    if directory.resolve() == root or root in directory.resolve().parents:
        raise UsageError(f"{directory} is inside the project ({root}); a root key never goes into the repo")
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory} is not empty; root keys go into a new directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    made, public = [], []
    for n in range(1, count + 1):
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(passphrase.encode()))
        path = directory / f"root-{n}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        made.append(path)
        key = SSlibKey.from_crypto(private.public_key())
        public.append({"keyid": key.keyid, "key": key.to_dict()})
    policy = {"threshold": threshold, "keys": public}
    (directory / POLICY_FILE).write_text(json.dumps(policy, indent=2, sort_keys=True) + "\n")
    return made


def load_root_keys(directories: list[Path]) -> RootKeys:
    """The root keys found in DIRECTORIES (each holder's: one or more root-N.pem) and their common policy."""
    policy: dict[str, object] | None = None
    signers: dict[str, CryptoSigner] = {}
    for directory in directories:
        path = directory / POLICY_FILE
        try:
            found = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{directory} holds no {POLICY_FILE}: not a root directory from `kiln keys root init`") \
                from None
        except ValueError as exc:
            raise UsageError(f"{path}: not JSON ({exc})") from None
        if policy is not None and found != policy:
            raise UsageError(f"{path}: another root's policy than the other --root directories'")
        policy = found
        pems = sorted(directory.glob(KEY_GLOB))
        if not pems:
            raise UsageError(f"{directory} holds no root key ({KEY_GLOB})")
        for pem in pems:
            signer = load_signer(pem)
            signers.setdefault(signer.public_key.keyid, signer)
    if policy is None:
        raise UsageError("no root directory given (--root DIR)")
    try:
        keys = tuple(SSlibKey.from_dict(str(k["keyid"]), dict(k["key"]))  # type: ignore[index]
                     for k in policy["keys"])  # type: ignore[attr-defined]
        threshold = int(policy["threshold"])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{POLICY_FILE}: malformed ({exc})") from None
    ids = {k.keyid for k in keys}
    stray = [k for k in signers if k not in ids]
    if stray:
        raise UsageError(f"a root key in the --root directories is not one {POLICY_FILE} names ({stray[0][:16]})")
    return RootKeys(tuple(signers[k.keyid] for k in keys if k.keyid in signers), threshold, keys)

