"""The device's own identity: an ed25519 key made on the device, on its first boot, in
`/var/lib/kiln/identity/device.pem` (mode 0600, data partition: it survives updates). The
device id is derived from its public key (kiln_device.fleet.device_id). The key never leaves
the device; the fleet service learns the public half at enrollment.

No TPM is used yet: the key is a file on the data partition (docs/fleet.md says what that
means and what a TPM-backed key would add). Imports `cryptography`, which the agent's venv
carries.
"""

from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_device.agent.errors import AgentError, log
from kiln_device.common import fsync_dir, write_atomic
from kiln_device.contract import CONFIG
from kiln_device.fleet import device_id

KEY_FILE = "device.pem"


@dataclass(frozen=True)
class Identity:
    id: str
    public_key: bytes
    private: Any  # Ed25519PrivateKey

    def sign(self, context: bytes, body: bytes) -> str:
        return base64.b64encode(self.private.sign(context + body)).decode()

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()


def load_or_create(directory: Path) -> Identity:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError as exc:
        raise AgentError(CONFIG, f"the device identity needs the cryptography package (agent venv): {exc}") from None
    path = directory / KEY_FILE
    if not path.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd, name = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=directory)  # 0600, a name of its own
        tmp = Path(name)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never replaces a key another run made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(directory)
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AgentError(CONFIG, f"{path}: the device key does not load ({exc}); this device cannot report "
                                 "until it is re-enrolled (remove the file: a new identity is made)") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise AgentError(CONFIG, f"{path}: not an ed25519 key")
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ident = Identity(device_id(public), public, private)
    if not (directory / "id").exists():
        write_atomic(directory / "id", (ident.id + "\n").encode())
        log(f"device identity {ident.id} created in {directory}")
    return ident
