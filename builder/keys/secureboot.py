"""Secure Boot keys: Kiln's own PK, KEK and db, kept in `secureboot/` of a release key directory.

    keys = make_secureboot_keys(Path("~/kiln-release-key/secureboot"), passphrase)  # kiln keys secureboot init
    sign_efi(keys, Path("kiln-a.efi"))          # sbsign with db: systemd-boot and every UKI
    make_enrolled_vars(keys, Path("OVMF_VARS_4M.fd"), Path("vars.fd"))  # PK, KEK and db in a VM's variables

The three are RSA 2048 keys with self-signed X.509 certificates, as UEFI firmware takes them:
- PK, the platform key, owns the variable store; KEK signs changes to db and dbx. Both are
  offline: `kiln keys export` carries neither (only db, for CI).
- db signs what boots: systemd-boot and each UKI (builder.image.uki). A build needs it.

The private keys are encrypted with the release key's passphrase (builder.core.secrets). sbsign
reads only an unencrypted key file, so `sign_efi` decrypts db into a file of its own (0600, in a
0700 directory that is removed when it returns), never on a command line or in a log.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from builder.core.errors import UsageError
from builder.core.run import find_tool, run

SECUREBOOT_DIR = "secureboot"
ROLES = ("PK", "KEK", "db")
OFFLINE = ("PK", "KEK")  # never exported with a key directory
OWNER_FILE = "owner-guid"
VALID_YEARS = 20
OVMF_DIR = Path("/usr/share/OVMF")
SECBOOT_CODE = {"x86_64": OVMF_DIR / "OVMF_CODE_4M.secboot.fd"}
BLANK_VARS = {"x86_64": OVMF_DIR / "OVMF_VARS_4M.fd"}


@dataclass(frozen=True)
class SecureBootKeys:
    directory: Path

    def key(self, role: str) -> Path:
        return self.directory / f"{role}.key"

    def cert(self, role: str) -> Path:
        return self.directory / f"{role}.crt"

    @property
    def owner(self) -> str:
        return (self.directory / OWNER_FILE).read_text().strip()

    def fingerprint(self, role: str = "db") -> str:
        cert = x509.load_pem_x509_certificate(self.cert(role).read_bytes())
        return cert.fingerprint(hashes.SHA256()).hex()


def make_secureboot_keys(directory: Path, passphrase: str | None, *, common_name: str = "Kiln") -> SecureBootKeys:
    """PK, KEK and db in DIRECTORY (new or empty), each key encrypted with PASSPHRASE when there is one."""
    directory = directory.expanduser().absolute()
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory} already holds Secure Boot keys; pick another directory to make new ones")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    (directory / OWNER_FILE).write_text(f"{uuid.uuid4()}\n")
    protect = serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else \
        serialization.NoEncryption()
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    for role in ROLES:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} Secure Boot {role}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=365 * VALID_YEARS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        fd = os.open(directory / f"{role}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, protect))
        (directory / f"{role}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return SecureBootKeys(directory)


def read_secureboot_keys(directory: Path, *, need: tuple[str, ...] = ("db",)) -> SecureBootKeys:
    keys = SecureBootKeys(directory.expanduser().absolute())
    missing = [str(p) for role in need for p in (keys.key(role), keys.cert(role)) if not p.is_file()]
    if not (keys.directory / OWNER_FILE).is_file():
        missing.append(str(keys.directory / OWNER_FILE))
    if missing:
        raise UsageError(f"{keys.directory} holds no Secure Boot keys for {', '.join(need)} "
                         f"({', '.join(missing[:3])} missing)",
                         hint=f"make them with: kiln keys secureboot init {keys.directory.parent}")
    mode = keys.directory.stat().st_mode
    if mode & 0o077:
        raise UsageError(f"{keys.directory}: readable by group or others (mode {mode & 0o777:o})",
                         hint=f"chmod -R go= {keys.directory}")
    return keys


@contextlib.contextmanager
def plain_key(keys: SecureBootKeys, role: str, passphrase: str | None) -> Iterator[Path]:
    """The role's private key, unencrypted, in a private directory that is gone when the block ends."""
    raw = keys.key(role).read_bytes()
    try:
        key = serialization.load_pem_private_key(raw, password=passphrase.encode() if passphrase else None)
    except TypeError:
        raise UsageError(f"{keys.key(role)} is encrypted and no passphrase was given",
                         hint="set KILN_KEY_PASSPHRASE_FILE (or KILN_KEY_PASSPHRASE)") from None
    except ValueError:
        raise UsageError(f"{keys.key(role)}: the passphrase does not open it") from None
    tmp = Path(tempfile.mkdtemp(prefix="kiln-sb-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        path = tmp / f"{role}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sign_efi(keys: SecureBootKeys, path: Path, passphrase: str | None, out: Path | None = None, *,
             epoch: int | None = None) -> Path:
    """sbsign PATH with db (in place unless OUT); the signature is an Authenticode certificate table.

    With `epoch` the signature is reproducible: sbsign puts the signing time in the signed attributes, so it
    runs under libfaketime with the clock frozen at the build's epoch (RSA PKCS#1 v1.5 itself is
    deterministic); the same image, key and epoch then give the same bytes, and the same image digest."""
    find_tool("sbsign")
    out = out or path
    tmp = out.with_name(out.name + ".signing")
    clock: list[str] = []
    if epoch is not None:
        frozen = datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        clock = [find_tool("faketime"), frozen]  # an absolute time: frozen, not started at
    with plain_key(keys, "db", passphrase) as key:
        run([*clock, "sbsign", "--key", key, "--cert", keys.cert("db"), "--output", tmp, path], capture=True,
            env={"TZ": "UTC"} if clock else None)
    tmp.replace(out)
    return out


def verify_efi(keys: SecureBootKeys, path: Path) -> bool:
    """Whether PATH carries a valid signature by db (sbverify)."""
    find_tool("sbverify")
    done = run(["sbverify", "--cert", keys.cert("db"), path], capture=True, check=False, quiet=True)
    return done.returncode == 0


def make_enrolled_vars(keys: SecureBootKeys, blank: Path, out: Path) -> Path:
    """An OVMF variable store with Kiln's PK, KEK and db enrolled and Secure Boot on (virt-fw-vars).
    db is enrolled explicitly: `--enroll-cert` alone would leave it empty."""
    tool = find_tool("virt-fw-vars")
    tmp = out.with_name(out.name + ".tmp")
    owner = keys.owner
    run([tool, "--input", blank, "--output", tmp, "--set-pk", owner, keys.cert("PK"),
         "--add-kek", owner, keys.cert("KEK"), "--add-db", owner, keys.cert("db"), "--sb", "--no-microsoft"],
        capture=True)
    tmp.replace(out)
    return out


def resolve_secureboot_keys(key_dir: Path, *, development: bool) -> SecureBootKeys:
    """The Secure Boot keys beside a release key (DIR/secureboot): a development key's are made on first use,
    unencrypted, like the key itself; a release key's must have been made (`kiln keys secureboot init DIR`)."""
    directory = key_dir / SECUREBOOT_DIR
    if development and not (directory / OWNER_FILE).is_file():
        shutil.rmtree(directory, ignore_errors=True)  # a half-made directory from an interrupted run
        return make_secureboot_keys(directory, None, common_name="Kiln development")
    return read_secureboot_keys(directory)
