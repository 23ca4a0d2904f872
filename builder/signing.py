"""Release signing: containers "simple signing" with GPG, signatures in a lookaside directory.

    key = make_signing_key(Path("~/kiln-release-key").expanduser())   # kiln keys init DIR
    key = resolve_signing_key(hc, None)       # --sign-key, $KILN_SIGNING_KEY, or a dev class's own
    # builder.publish.push_signed("qemu-x86_64", "1.1.0", "127.0.0.1:5000", key=key, channel="stable")
    files = finalize_device_files("qemu-x86_64", key)   # baked under /usr/lib/kiln/

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

The key lives in a private GNUPGHOME under the directory `kiln keys init` was given,
never in the project tree; only `release-key.asc` (the public key) goes into images.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from builder import paths
from builder.errors import CommandFailed, RegistryError, UsageError
from builder.files import write_if_changed
from builder.run import run
from builder.secrets import key_passphrase, passphrase_file
from builder.spec import HardwareClass
from builder.state import StateDir
from kiln_device import contract

GNUPG_DIR = "gnupg"
PUBLIC_KEY = "release-key.asc"
KEY_RECORD = "key.json"
IDENTITY_PREFIX = "release.kiln.invalid/kiln"
# Where images carry the verification material (read-only /usr).
DEVICE_KEY_PATH = contract.RELEASE_KEY
DEVICE_POLICY_PATH = contract.POLICY_JSON


# -- keys ---------------------------------------------------------------------------------


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
                     development: bool = False) -> SigningKey:
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
    # The passphrase goes on stdin, never on the command line (builder.secrets); empty: an unprotected key.
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
    from builder.trust import make_trust_keys  # the TUF half: root, targets and online keys, root v1

    make_trust_keys(directory, passphrase)
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


def export_key(directory: Path) -> str:
    """The key directory as base64 of a gzipped tar (GNUPGHOME without gpg-agent's sockets, the TUF keys)."""
    import base64
    import io
    import tarfile

    key = read_signing_key(directory)
    stop_agent(key)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(key.directory.rglob("*")):
            if path.is_file() and not path.is_symlink() and not path.name.startswith("S.gpg-agent"):
                tar.add(path, arcname=str(path.relative_to(key.directory)), recursive=False)
    return base64.b64encode(buf.getvalue()).decode()


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
    from builder.trust import TUF_DIR

    secret = [directory, directory / GNUPG_DIR, directory / TUF_DIR, *sorted((directory / TUF_DIR).glob("*.pem"))]
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
        from builder.trust import make_trust_keys

        make_trust_keys(dev)  # a checkout's key from before trusted channels gains its TUF half
        return read_signing_key(dev)
    return make_signing_key(dev, uid=f"Kiln development key for {hc.name} <dev@kiln.invalid>", development=True)


# -- policy and registries.d ----------------------------------------------------------------


def signed_identity(cls: str) -> str:
    """The repository every signature of CLASS names (exactRepository in the policy)."""
    return f"{IDENTITY_PREFIX}/{cls}"


def render_policy(cls: str, key_path: str | Path = DEVICE_KEY_PATH) -> str:
    """containers-policy.json: every docker image must be signed by the release key for CLASS.

    Everything else (other transports) is rejected. The identity rule survives tags:
    a channel tag and a version tag of the same digest verify with the same signature."""
    policy = {
        "default": [{"type": "reject"}],
        "transports": {
            "docker": {
                "": [{
                    "type": "signedBy",
                    "keyType": "GPGKeys",
                    "keyPath": str(key_path),
                    "signedIdentity": {"type": "exactRepository", "dockerRepository": signed_identity(cls)},
                }],
            },
        },
    }
    return json.dumps(policy, indent=2) + "\n"


def render_registries_d(lookaside: str, *, scope: str | None = None, staging: str | None = None) -> str:
    """registries.d YAML: where signatures are read (lookaside) and written (lookaside-staging).

    With `scope` (host[:port][/path]) it applies to that registry only, otherwise to all."""
    body = [f"lookaside: {json.dumps(lookaside)}"]
    if staging:
        body.append(f"lookaside-staging: {json.dumps(staging)}")
    head, indent = (["docker:", f"  {json.dumps(scope)}:"], "    ") if scope else (["default-docker:"], "  ")
    return "# Written by Kiln. Edits are overwritten.\n" + "\n".join(head + [indent + x for x in body]) + "\n"


def finalize_device_files(cls: str, key: SigningKey) -> dict[str, bytes]:
    """What an image of CLASS bakes under /usr (path relative to / -> bytes): the release key and the
    policy that checks image signatures, and the TUF root its channel is verified with (builder.trust)
    when the key directory has one."""
    from builder.trust import trust_root

    files = {
        DEVICE_KEY_PATH.lstrip("/"): key.public_key.read_bytes(),
        DEVICE_POLICY_PATH.lstrip("/"): render_policy(cls).encode(),
    }
    root = trust_root(key.directory)
    if root is not None:
        files[contract.TRUST_ROOT.lstrip("/")] = root
    return files


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
    authfile: Path | None = None  # builder.secrets: credentials never go on a command line
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


def describe_key(key: SigningKey) -> str:
    return (f"fingerprint {key.fingerprint}\npublic key  {key.public_key}\n"
            f"private key {key.gnupghome} (GNUPGHOME; keep it out of the repo, back it up)")
