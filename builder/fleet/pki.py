"""The fleet service's TLS: a CA of its own and the service's certificate (`kiln fleet init`).

    DIR/ca.pem        the CA certificate: devices trust it (`kiln disk --etc kiln/fleet-ca.pem=DIR/ca.pem`)
    DIR/ca.key        the CA's key (0600): only `kiln fleet init --renew` needs it
    DIR/server.pem    the service's certificate for the names and addresses given (--host)
    DIR/server.key    its key (0600)

EC P-256 keys; the certificate lives 397 days (what browsers accept). Devices authenticate the
service by this CA, and the service authenticates each device by its own ed25519 key
(kiln_device.fleet): there is no client certificate to issue or to revoke.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from builder.core.errors import UsageError

FILES = ("ca.pem", "ca.key", "server.pem", "server.key")


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def init(directory: Path, hosts: list[str], *, renew: bool = False) -> list[Path]:
    """Make the CA (unless it exists) and the server certificate for HOSTS (again with RENEW)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise UsageError("name at least one --host the devices reach the service at (a DNS name or an IP address)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    pem = serialization.Encoding.PEM
    made = []
    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if not ca_cert_path.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Kiln fleet CA")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=3650))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), 0o600)
        _write(ca_cert_path, ca.public_bytes(pem), 0o644)
        made += [ca_cert_path, ca_key_path]
    if (directory / "server.pem").exists() and not renew:
        return made
    signing_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=397))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(signing_key, hashes.SHA256()))  # type: ignore[arg-type]
    _write(directory / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), 0o600)
    _write(directory / "server.pem", cert.public_bytes(pem), 0o644)
    return [*made, directory / "server.pem", directory / "server.key"]


def require(directory: Path) -> tuple[Path, Path]:
    missing = [f for f in ("server.pem", "server.key") if not (directory / f).is_file()]
    if missing:
        raise UsageError(f"{directory}: no {', '.join(missing)}", hint=f"run `kiln fleet init {directory} --host HOST`")
    return directory / "server.pem", directory / "server.key"
