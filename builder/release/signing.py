"""Release signing: containers "simple signing" with GPG, signatures in a lookaside directory.

    key = resolve_signing_key(hc, None)       # builder.keys.release_key
    # builder.release.publish.push_signed("qemu-x86_64", "1.1.0", "127.0.0.1:5000", key=key, channel="stable")

Debian's skopeo and podman have sigstore compiled out; simple signing works. How a
release reaches a registry without ever leaving a pullable unsigned tag:

1. push the image to `<registry>/kiln/<class>:staging-<tag>` (devices never look there,
   and their policy refuses it anyway: it has no signature);
2. read its manifest back by digest, sign it with `skopeo standalone-sign`, check the
   signature with `skopeo standalone-verify`, store it in the lookaside directory at
   `<dir>/kiln/<class>@sha256=<hex>/signature-1` (what an HTTP server serves to devices);
3. promote: `skopeo copy --preserve-digests docker://...@digest docker://...:<tag>`
   under the device's own policy.json and a registries.d that reads that directory, so
   a tag moves only once the published signature verifies the way a device checks it.
   The channel tag (`stable`) moves last.

The signed identity is `release.kiln.invalid/kiln/<class>`, a name for "release of
Kiln class <class>", not a location: the device's policy pins it with
`signedIdentity: exactRepository`, so the same signature verifies on every tag
(version and channel), from the registry CI pushed to, a mirror, or 10.0.2.2 inside
QEMU, while a signature for another class's image is refused.

The key is builder.keys.release_key's; what images bake from it, builder.keys.device_files's.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import CommandFailed, RegistryError
from builder.core.files import write_if_changed
from builder.core.run import run
from builder.core.secrets import passphrase_file
from builder.core.state import StateDir
from builder.keys.device_files import render_policy, render_registries_d, signed_identity
from builder.keys.release_key import SigningKey


def finalize_lookaside_dir(state: StateDir) -> Path:
    """Default signature directory: <state>/signatures (serve it over HTTP to devices)."""
    return state.root / "signatures"


def signature_path(lookaside_dir: Path, repo_path: str, digest: str, index: int = 1) -> Path:
    """containers/image's lookaside layout: <dir>/<repo path>@sha256=<hex>/signature-<n>."""
    algo, _, hexd = digest.partition(":")
    return lookaside_dir / f"{repo_path}@{algo}={hexd}" / f"signature-{index}"


@dataclass(frozen=True)
class Verifier:
    """A policy.json + registries.d pair on the build machine that checks like a device does."""

    policy: Path
    registries_d: Path

    def args(self) -> list[str]:
        return ["--policy", str(self.policy), "--registries.d", str(self.registries_d)]


def make_verifier(state: StateDir, cls: str, key: SigningKey, lookaside_dir: Path, registry: str) -> Verifier:
    d = state.root / "signing" / cls
    (d / "registries.d").mkdir(parents=True, exist_ok=True)
    policy = d / "policy.json"
    write_if_changed(policy, render_policy(cls, key.public_key))
    url = lookaside_dir.absolute().as_uri()
    write_if_changed(d / "registries.d" / "kiln.yaml",
                     render_registries_d(url, scope=registry.split("/", 1)[0], staging=url))
    return Verifier(policy, d / "registries.d")


# -- signing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """How to reach the registry: TLS verification, credentials, client certificates."""

    tls_verify: bool = True
    authfile: Path | None = None  # builder.core.secrets: credentials never go on a command line
    cert_dir: Path | None = None

    def args(self, *sides: str) -> list[str]:
        """skopeo flags per side ("" for inspect, "src-"/"dest-" for copy)."""
        out = []
        for side in sides:
            out.append(f"--{side}tls-verify={'true' if self.tls_verify else 'false'}")
            if self.authfile:
                out.append(f"--{side}authfile={self.authfile}")
            if self.cert_dir:
                out.append(f"--{side}cert-dir={self.cert_dir}")
        return out


def raw_manifest(ref: str, *, access: Access, state: StateDir) -> bytes:
    """The manifest bytes the registry serves for REF (repo:tag or repo@digest), as they are; CommandFailed when it
    cannot (the caller says what that means: no such tag, a refused image)."""
    return bytes(run(["skopeo", "inspect", "--raw", *access.args(""), f"docker://{ref}"], env=state.engine_env(),
                     capture=True, quiet=True).stdout)


def read_manifest(repo: str, digest: str, *, access: Access, state: StateDir) -> bytes:
    """The manifest bytes of repo@digest, checked against the digest."""
    raw = raw_manifest(f"{repo}@{digest}", access=access, state=state)
    if f"sha256:{hashlib.sha256(raw).hexdigest()}" != digest:
        raise RegistryError(f"{repo}@{digest[:19]}: the registry returned a manifest with another digest")
    return raw


def make_signature(repo: str, digest: str, tag: str, *, cls: str, key: SigningKey, lookaside_dir: Path,
                   access: Access, state: StateDir) -> Path:
    """Sign repo@digest as `<identity>:<tag>`; verify it; store it in the lookaside dir."""
    manifest = read_manifest(repo, digest, access=access, state=state)
    identity = f"{signed_identity(cls)}:{tag}"
    dest = signature_path(lookaside_dir, repo.split("/", 1)[1], digest)
    with tempfile.TemporaryDirectory(dir=state.tmp_dir) as tmp:
        mfile, sig = Path(tmp) / "manifest.json", Path(tmp) / "signature"
        mfile.write_bytes(manifest)
        try:
            with passphrase_file(state.tmp_dir) as phrase:  # else gpg-agent's
                extra: list[str | Path] = ["--passphrase-file", phrase] if phrase else []
                run(["skopeo", "standalone-sign", *extra, mfile, identity, key.fingerprint, "--output", sig],
                    env=key.env(), capture=True)
            run(["skopeo", "standalone-verify", mfile, identity, key.fingerprint, sig],
                env=key.env(), capture=True, quiet=True)
        except CommandFailed as exc:
            raise RegistryError(f"signing {repo}@{digest[:19]} with {key.fingerprint}: {exc}") from exc
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.with_name(f".{dest.name}.tmp")
        staged.write_bytes(sig.read_bytes())
        staged.replace(dest)
    return dest
