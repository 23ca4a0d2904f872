"""A private key file as a TUF signer: PEM (PKCS#8), encrypted with the release key's passphrase or not."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner

from builder.core.errors import UsageError


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
