"""The device's own identity: a key made on the device, on its first boot, that never leaves it.
The device id is derived from its public key (kiln_device.fleet.device_id); the fleet service
learns the public half at enrollment.

Two places for the key, chosen once, on first use, by agent.json `fleet.identity`:

- `tpm`: an ECDSA P-256 key made by the device's TPM 2.0 (which has no ed25519), as a primary
  key of the owner hierarchy with the attributes fixedTPM, fixedParent, sensitiveDataOrigin and
  sign: its private half never exists outside the TPM. It is kept at the persistent handle
  TPM_HANDLE; `/var/lib/kiln/identity/tpm.json` records the handle and the public key, and each
  use checks that the TPM still holds that key. Signing runs tpm2-tools (`tpm2_sign` over the
  SHA-256 digest; the signature is DER). The TPM is reached through $TPM2TOOLS_TCTI, else
  /dev/tpmrm0 (the kernel's resource manager).
- `file`: an ed25519 key in `/var/lib/kiln/identity/device.pem` (mode 0600, data partition).
- `auto` (the default): `tpm` where a TPM and tpm2-tools are present, else `file`.

Once made, an identity stays what it is: a device whose key is a file keeps it when a TPM
appears, and a TPM identity never falls back to a file when the TPM stops answering (the
device would report under a new id). A mode that contradicts the identity already made is an
error that says how to start over (remove the identity directory: the device enrolls anew).
Both survive updates (the data partition). A TPM cleared by its owner loses the key: the
device then needs a new identity, as docs/fleet.md says.

Imports `cryptography` (the agent's venv carries it) for the file key only.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_device.common import fsync_dir, write_atomic
from kiln_device.contract import CONFIG, IDENTITY_MODES
from kiln_device.errors import AgentError, log
from kiln_device.fleet import KEY_ECDSA_P256, KEY_ED25519, device_id

KEY_FILE = "device.pem"
TPM_FILE = "tpm.json"
ID_FILE = "id"
MODES = IDENTITY_MODES
# Persistent handle of the device key: the owner range (TCG "Registry of Reserved TPM 2.0 Handles":
# 0x81000000-0x8100FFFF), away from the SRK's conventional 0x81000001.
TPM_HANDLE = 0x81000100
TPM_DEVICE = "/dev/tpmrm0"
TCTI_ENV = "TPM2TOOLS_TCTI"
# The key's template: ECC P-256 for ECDSA-SHA256, non-duplicable, made inside the TPM, usable with
# the (empty) owner auth of a device that has not set one.
TPM_ALG = "ecc256:ecdsa-sha256"
# noda: the key has no auth value to guess, so the TPM's dictionary-attack lockout (which other software may
# trip) must not stop it from signing.
TPM_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign"
TPM_SETTLE = 10.0  # seconds: on a first boot the kernel may still be probing the TPM the firmware announced
TPM_TIMEOUT = 60  # seconds: one tpm2-tools command (a slow TPM takes well under a second)


@dataclass(frozen=True)
class Identity:
    id: str
    key_type: str  # KEY_ED25519 or KEY_ECDSA_P256
    public_key: bytes  # raw ed25519, or the DER SubjectPublicKeyInfo of the P-256 key
    store: str  # "file" or "tpm"
    private: Any = None  # Ed25519PrivateKey for a file key; None for a TPM key
    tpm_handle: int | None = None

    def sign(self, context: bytes, body: bytes) -> str:
        if self.private is not None:
            return base64.b64encode(self.private.sign(context + body)).decode()
        assert self.tpm_handle is not None
        return base64.b64encode(tpm_sign(self.tpm_handle, hashlib.sha256(context + body).digest())).decode()

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()


# --- the TPM, through tpm2-tools ---------------------------------------------------------------


def tpm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault(TCTI_ENV, f"device:{TPM_DEVICE}")  # never try a resource manager daemon the image lacks
    return env


def tpm_announced() -> bool:
    """The firmware or the kernel says there is a TPM (its device node may not be there yet)."""
    return os.path.exists("/sys/firmware/acpi/tables/TPM2") or any(Path("/sys/class/tpm").glob("tpm*"))


def tpm_present() -> str | None:
    """None when a TPM can be used here, else why not."""
    if shutil.which("tpm2_createprimary") is None:
        return "tpm2-tools is not installed"
    if os.environ.get(TCTI_ENV):
        return None
    deadline = time.monotonic() + (TPM_SETTLE if tpm_announced() else 0)
    while not os.path.exists(TPM_DEVICE):
        if time.monotonic() >= deadline:
            return f"no TPM ({TPM_DEVICE} does not exist)"
        time.sleep(0.25)
    return None


def tpm(*args: str, what: str) -> bytes:
    try:
        proc = subprocess.run(args, env=tpm_env(), capture_output=True, timeout=TPM_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(CONFIG, f"the TPM: {what}: {exc}") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        if any("ERROR:" in ln for ln in lines):
            why = next(ln for ln in lines if "ERROR:" in ln).split("ERROR:", 1)[1].strip() + f" ({why})"
        raise AgentError(CONFIG, f"the TPM: {what}: {args[0]}: {why}")
    return proc.stdout


def tpm_public(target: str, scratch: Path) -> bytes:
    """The DER SubjectPublicKeyInfo of the key at TARGET (a handle or a context file)."""
    out = scratch / "public.der"
    out.unlink(missing_ok=True)
    tpm("tpm2_readpublic", "-c", target, "-f", "der", "-o", str(out), what=f"read the public key of {target}")
    return out.read_bytes()


def tpm_persistent() -> set[int]:
    text = tpm("tpm2_getcap", "handles-persistent", what="list the persistent handles").decode()
    return {int(line.strip("- \t"), 16) for line in text.splitlines() if line.strip("- \t").startswith("0x")}


def tpm_sign(handle: int, digest: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="kiln-tpm-") as d:
        dig, sig = Path(d) / "digest", Path(d) / "signature"
        dig.write_bytes(digest)
        tpm("tpm2_sign", "-c", hex(handle), "-g", "sha256", "-d", "-f", "plain", "-o", str(sig), str(dig),
            what=f"sign with the device key at {hex(handle)}")
        return sig.read_bytes()  # DER: SEQUENCE { r, s }


def tpm_create(directory: Path, handle: int) -> bytes:
    """Make the device key in the TPM and keep it at HANDLE; its public key (DER). The key is a primary
    key: the same TPM seed and template give the same key, so a run cut short between making it and
    recording it makes it again, identical. A handle holding another key is never overwritten."""
    with tempfile.TemporaryDirectory(prefix="kiln-tpm-") as d:
        scratch = Path(d)
        ctx, der = scratch / "key.ctx", scratch / "key.der"
        try:
            tpm("tpm2_createprimary", "-Q", "-C", "o", "-G", TPM_ALG, "-a", TPM_ATTRIBUTES, "-c", str(ctx),
                "-f", "der", "-o", str(der), what="make the device key")
            public = der.read_bytes()
            if handle in tpm_persistent():
                held = tpm_public(hex(handle), scratch)
                if held != public:
                    raise AgentError(CONFIG, f"the TPM: the persistent handle {hex(handle)} holds another key; "
                                             "Kiln does not evict it (tpm2_evictcontrol -C o -c "
                                             f"{hex(handle)} frees it, if it is no one's)")
            else:
                tpm("tpm2_evictcontrol", "-C", "o", "-c", str(ctx), hex(handle),
                    what=f"keep the key at {hex(handle)}")
        finally:
            # Without a resource manager (/dev/tpm0, a simulator) the transient copies stay loaded and fill
            # the TPM's few object slots: flush them (the persistent key stays).
            with contextlib.suppress(AgentError):
                tpm("tpm2_flushcontext", "-t", what="flush the transient objects")
    write_atomic(directory / TPM_FILE, (json.dumps({"handle": hex(handle), "keyType": KEY_ECDSA_P256,
                                                    "public": base64.b64encode(public).decode()},
                                                   indent=2, sort_keys=True) + "\n").encode())
    return public


def tpm_load(directory: Path) -> Identity:
    path = directory / TPM_FILE
    try:
        record = json.loads(path.read_text())
        handle = int(record["handle"], 16)
        public = base64.b64decode(record["public"], validate=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AgentError(CONFIG, f"{path}: unreadable ({exc}); remove {directory} to make a new identity "
                                 "(the device enrolls again under a new id)") from None
    missing = tpm_present()
    if missing:
        raise AgentError(CONFIG, f"{path}: this device's key is in its TPM, but {missing}")
    held = None
    if handle in tpm_persistent():
        with tempfile.TemporaryDirectory(prefix="kiln-tpm-") as d:
            held = tpm_public(hex(handle), Path(d))
    if held != public:
        raise AgentError(CONFIG, f"the TPM no longer holds this device's key at {hex(handle)} (was it cleared?); "
                                 f"remove {directory} to make a new identity (the device enrolls again under a new id)")
    return Identity(device_id(public), KEY_ECDSA_P256, public, "tpm", tpm_handle=handle)


# --- a key in a file ----------------------------------------------------------------------------


def file_create(directory: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd, name = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=directory)  # 0600, a name of its own
    tmp = Path(name)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, directory / KEY_FILE)  # never replaces a key another run made first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(directory)


def file_load(directory: Path) -> Identity:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = directory / KEY_FILE
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AgentError(CONFIG, f"{path}: the device key does not load ({exc}); this device cannot report "
                                 "until it is re-enrolled (remove the file: a new identity is made)") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise AgentError(CONFIG, f"{path}: not an ed25519 key")
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Identity(device_id(public), KEY_ED25519, public, "file", private=private)


# --- either ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def creating(directory: Path) -> Iterator[None]:
    """One run makes the identity; another waits for it (the boot and a report may start together)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def load_or_create(directory: Path, mode: str = "auto") -> Identity:
    """This device's identity: the one already made, else a new one where MODE says (module doc)."""
    if mode not in MODES:
        raise AgentError(CONFIG, f"fleet.identity: {mode!r}: expected one of {', '.join(MODES)}")
    try:
        import cryptography  # noqa: F401  (the file key, and every check of a key, need it)
    except ImportError as exc:
        raise AgentError(CONFIG, f"the device identity needs the cryptography package (agent venv): {exc}") from None
    made = None
    if not (directory / KEY_FILE).exists() and not (directory / TPM_FILE).exists():
        with creating(directory):
            if not (directory / KEY_FILE).exists() and not (directory / TPM_FILE).exists():
                missing = tpm_present() if mode != "file" else "fleet.identity is file"
                if mode == "tpm" and missing:
                    raise AgentError(CONFIG, f"fleet.identity is tpm, but {missing}")
                if not missing:
                    try:
                        tpm_create(directory, TPM_HANDLE)
                        made = f"an ECDSA P-256 key in the TPM at {hex(TPM_HANDLE)}"
                    except AgentError as exc:
                        if mode == "tpm":
                            raise
                        missing = exc.message  # auto: nothing was recorded yet, so a key file is this identity
                        log(f"warning: the TPM cannot make the device key: {missing}; using a key file")
                if missing:
                    file_create(directory)
                    made = f"an ed25519 key in {directory / KEY_FILE}" + (f" ({missing})" if mode == "auto" else "")
    if (directory / TPM_FILE).exists():
        if mode == "file":
            raise AgentError(CONFIG, f"fleet.identity is file, but this device's identity is a TPM key "
                                     f"({directory / TPM_FILE}); remove {directory} to start over under a new id")
        ident = tpm_load(directory)
    else:
        if mode == "tpm":
            raise AgentError(CONFIG, f"fleet.identity is tpm, but this device's identity is a key file "
                                     f"({directory / KEY_FILE}); remove {directory} to start over under a new id")
        ident = file_load(directory)
    if read_id(directory) != ident.id:
        write_atomic(directory / ID_FILE, (ident.id + "\n").encode())
    if made:
        log(f"device identity {ident.id} created: {made}")
    return ident


def read_id(directory: Path) -> str | None:
    try:
        return (directory / ID_FILE).read_text().strip() or None
    except OSError:
        return None


def device_id_of(directory: Path, mode: str = "auto") -> str:
    """The device id alone (a rollout wave needs nothing more): the recorded one, without touching the key."""
    return read_id(directory) or load_or_create(directory, mode).id
