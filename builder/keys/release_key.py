"""The release key: a GPG key (containers "simple signing") and its TUF half, in one key directory.

    key = make_signing_key(Path("~/kiln-release-key").expanduser())   # kiln keys init DIR
    key = resolve_signing_key(hc, None)       # --sign-key, $KILN_SIGNING_KEY, or a dev class's own
    print(describe_key(key))

The key lives in a private GNUPGHOME under the directory `kiln keys init` was given, never in the
project tree; only `release-key.asc` (the public key) goes into images (builder.keys.device_files).
The TUF keys beside it are builder.keys.tuf_keys's.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from builder.core import paths
from builder.core.errors import UsageError
from builder.core.run import run
from builder.core.secrets import key_passphrase
from builder.keys.root_keys import RootKeys
from builder.spec.schema import HardwareClass

GNUPG_DIR = "gnupg"
PUBLIC_KEY = "release-key.asc"
KEY_RECORD = "key.json"


@dataclass(frozen=True)
class SigningKey:
    directory: Path
    fingerprint: str

    @property
    def gnupghome(self) -> Path:
        return self.directory / GNUPG_DIR

    @property
    def public_key(self) -> Path:
        return self.directory / PUBLIC_KEY

    def env(self) -> dict[str, str]:
        return {"GNUPGHOME": str(self.gnupghome)}


def check_outside_project(directory: Path) -> None:
    root = paths.project_root().resolve()
    resolved = directory.expanduser().resolve()
    if resolved == root or root in resolved.parents:
        raise UsageError(f"{directory} is inside the project ({root}); a signing key never goes into the repo",
                         hint="pick a directory elsewhere, e.g. ~/.config/kiln/release-key")


def make_signing_key(directory: Path, *, uid: str = "Kiln release signing <release@kiln.invalid>",
                     development: bool = False, roots: RootKeys | None = None) -> SigningKey:
    """Create an ed25519 signing key in DIR/gnupg (mode 0700); export DIR/release-key.asc.

    `development` allows DIR inside the project (the ignored build/ dir): the
    per-checkout key of development classes, like their SSH test key.
    """
    directory = directory.expanduser().absolute()
    if not development:
        check_outside_project(directory)
    if (directory / KEY_RECORD).exists():
        existing = read_signing_key(directory)
        raise UsageError(f"{directory} already holds signing key {existing.fingerprint}; "
                         "pick another directory to make a new one")
    passphrase = None if development else key_passphrase()  # development keys sign test releases only
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    key = SigningKey(directory, "")
    key.gnupghome.mkdir(mode=0o700, exist_ok=True)
    # The passphrase goes on stdin, never on the command line (builder.core.secrets); empty: an unprotected key.
    run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0",
         "--quick-gen-key", uid, "ed25519", "sign", "never"], env=key.env(), capture=True,
        input=(passphrase or "").encode() + b"\n")
    fingerprint = finalize_fingerprint(key)
    exported = run(["gpg", "--batch", "--armor", "--export", fingerprint], env=key.env(), capture=True, quiet=True)
    key.public_key.write_bytes(exported.stdout)
    record = {"fingerprint": fingerprint, "uid": uid, "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "publicKey": PUBLIC_KEY, "development": development, "passphrase": passphrase is not None}
    (directory / KEY_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    stop_agent(key)
    from builder.keys.tuf_keys import make_trust_keys  # the TUF half: root, targets and online keys, root v1

    make_trust_keys(directory, passphrase, roots=roots)
    from builder.keys.secureboot import SECUREBOOT_DIR, make_secureboot_keys  # PK, KEK, db: verified boot

    make_secureboot_keys(directory / SECUREBOOT_DIR, passphrase,
                         common_name="Kiln development" if development else "Kiln")
    return SigningKey(directory, fingerprint)


def stop_agent(key: SigningKey) -> None:
    """gpg starts an agent per key directory and leaves it running: stop it when Kiln is done."""
    if key.gnupghome.is_dir():
        run(["gpgconf", "--kill", "gpg-agent"], env=key.env(), check=False, capture=True, quiet=True)


def finalize_fingerprint(key: SigningKey) -> str:
    out = run(["gpg", "--batch", "--with-colons", "--list-secret-keys"], env=key.env(), capture=True, quiet=True)
    fprs = [line.split(":")[9] for line in out.stdout.decode().splitlines() if line.startswith("fpr:")]
    if not fprs:
        raise UsageError(f"{key.gnupghome} holds no secret key")
    return fprs[0]


def read_signing_key(directory: Path) -> SigningKey:
    directory = directory.expanduser().absolute()
    try:
        record = json.loads((directory / KEY_RECORD).read_text())
        key = SigningKey(directory, str(record["fingerprint"]))
    except FileNotFoundError:
        raise UsageError(f"{directory} holds no Kiln signing key ({KEY_RECORD} is missing)",
                         hint=f"create one with: kiln keys init {directory}") from None
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{directory / KEY_RECORD}: not a Kiln key record ({exc})") from None
    if not key.public_key.is_file():
        raise UsageError(f"{key.public_key} is missing (re-export it: GNUPGHOME={key.gnupghome} "
                         f"gpg --armor --export {key.fingerprint} > {key.public_key})")
    check_private(directory)
    return key


RELEASE_KEY_ENV = "KILN_RELEASE_KEY"


# What each holder gets from `kiln keys export --for`: CI signs images and releases (the GPG key, targets, the
# online key for snapshot and timestamp, rollout to start a release's waves); the fleet service only halts,
# promotes and re-signs snapshot and timestamp (online, rollout). Neither ever gets a root key.
EXPORT_FOR = {"ci": None, "fleet": ("key.json", PUBLIC_KEY, "tuf/root.json", "tuf/online.pem", "tuf/rollout.pem")}


# Secure Boot's platform key and key-exchange key own the devices' firmware: offline, like the TUF root. db (which
# signs every UKI a build makes) goes to CI.
OFFLINE_SECUREBOOT = ("secureboot/PK.key", "secureboot/KEK.key")


def exported_files(directory: Path, holder: str = "ci") -> tuple[list[Path], list[Path]]:
    """(what `kiln keys export --for HOLDER` carries, the root keys it leaves out)."""
    wanted = EXPORT_FOR[holder]
    carried, left = [], []
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.is_symlink() or path.name.startswith("S.gpg-agent"):
            continue
        rel = str(path.relative_to(directory))
        if path.name == "root.pem" or (path.name.startswith("root-") and path.suffix == ".pem") or \
                rel in OFFLINE_SECUREBOOT:
            left.append(path)  # the root stays offline, whoever the export is for; so do Secure Boot's PK and KEK
        elif wanted is None or rel in wanted:
            carried.append(path)
    return carried, left


def export_key(directory: Path, holder: str = "ci") -> tuple[str, list[Path]]:
    """The key directory, as HOLDER needs it, as base64 of a gzipped tar (GNUPGHOME without gpg-agent's
    sockets, the TUF keys); and the root keys it left out."""
    import base64
    import io
    import tarfile

    key = read_signing_key(directory)
    stop_agent(key)
    carried, left = exported_files(key.directory, holder)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in carried:
            tar.add(path, arcname=str(path.relative_to(key.directory)), recursive=False)
    return base64.b64encode(buf.getvalue()).decode(), left


def import_key(directory: Path) -> SigningKey:
    """Unpack $KILN_RELEASE_KEY into DIRECTORY (which must not exist yet): owner-only modes throughout."""
    import base64
    import binascii
    import io
    import tarfile

    raw = os.environ.get(RELEASE_KEY_ENV, "")
    if not raw.strip():
        raise UsageError(f"${RELEASE_KEY_ENV} is empty: put the output of `kiln keys export DIR` in it (a CI secret)")
    import shutil

    directory = directory.expanduser().absolute()
    if directory.exists():
        raise UsageError(f"{directory} exists; import into a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))  # 0700
    try:
        data = base64.b64decode(raw.strip(), validate=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise UsageError(f"${RELEASE_KEY_ENV}: {m.name!r} is not a file of a key directory")
            for m in members:
                dest = staging / m.name
                for parent in reversed(dest.relative_to(staging).parents):
                    (staging / parent).mkdir(mode=0o700, exist_ok=True)
                fh = tar.extractfile(m)
                assert fh is not None
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(fh.read())
        read_signing_key(staging)
        staging.rename(directory)  # whole or not at all: a failed import leaves nothing to clean
    except (binascii.Error, tarfile.TarError, OSError, EOFError) as exc:
        raise UsageError(f"${RELEASE_KEY_ENV}: not a key from `kiln keys export` ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_signing_key(directory)


def check_private(directory: Path) -> None:
    """Refuse a key directory whose secret parts (the directory, GNUPGHOME, the TUF keys) group or others can
    read: a release key another user of the machine can copy signs what they like."""
    from builder.keys.tuf_keys import TUF_DIR

    secret = [directory, directory / GNUPG_DIR, directory / TUF_DIR, *sorted((directory / TUF_DIR).glob("*.pem")),
              directory / "secureboot", *sorted((directory / "secureboot").glob("*.key"))]
    for path in secret:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            raise UsageError(f"{path}: readable by group or others (mode {mode & 0o777:o}); a release key "
                             "directory is for its owner only", hint=f"chmod -R go= {directory}")


def check_key_for_class(hc: HardwareClass, key: SigningKey) -> None:
    """A production class refuses a development key: devices that trust it would take any checkout's builds."""
    if not hc.spec.development and is_development_key(key):
        raise UsageError(f"{hc.name} is a production class: it refuses the development key in {key.directory} "
                         "(devices that trust it would take any checkout's builds)",
                         hint="make a release key with: kiln keys init DIR (outside the project)")


def is_development_key(key: SigningKey) -> bool:
    """A per-checkout development key: so recorded, or (made before the record said) kept inside the project."""
    try:
        record = json.loads((key.directory / KEY_RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("development"):
        return True
    root = paths.project_root().resolve()
    resolved = key.directory.resolve()
    return resolved == root or root in resolved.parents


SIGNING_KEY_ENV = "KILN_SIGNING_KEY"


def resolve_signing_key(hc: HardwareClass, key_dir: Path | None) -> SigningKey:
    """The release key whose public half the image trusts.

    `--sign-key DIR` or $KILN_SIGNING_KEY (made with `kiln keys init DIR`, outside
    the project); development classes fall back to a per-checkout key in
    build/<class>/dev-release-key/ (made once, like their SSH test key).
    """
    raw = key_dir or (Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV) else None)
    if raw is not None:
        key = read_signing_key(raw)
        check_key_for_class(hc, key)
        return key
    if not hc.spec.development:
        raise UsageError(f"{hc.name} is a production class: its images must trust a release key; "
                         f"pass --sign-key DIR or set {SIGNING_KEY_ENV}", hint="make one with: kiln keys init DIR")
    dev = paths.dev_signing_key_dir(hc.name)
    if (dev / KEY_RECORD).is_file():
        from builder.keys.tuf_keys import make_trust_keys

        make_trust_keys(dev)  # a checkout's key from before trusted channels gains its TUF half
        return read_signing_key(dev)
    return make_signing_key(dev, uid=f"Kiln development key for {hc.name} <dev@kiln.invalid>", development=True)



def describe_key(key: SigningKey) -> str:
    return (f"fingerprint {key.fingerprint}\npublic key  {key.public_key}\n"
            f"private key {key.gnupghome} (GNUPGHOME; keep it out of the repo, back it up)")
