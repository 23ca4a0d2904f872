"""Publishing built images: push, signed push (staging tag, sign, promote), and the record of it.

    ctx = make_context()
    record = push_build(ctx, "qemu-x86_64", "1.0.0", "127.0.0.1:5000")
    record = push_signed(ctx, "qemu-x86_64", "1.1.0", "127.0.0.1:5000", key=key, channel="stable")

Both take the image by the id build.json recorded (checked to be still in the engine's
store) and add what they pushed to the record. How a signed push never leaves a pullable
unsigned tag is told in builder.release.signing.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from builder.core import records
from builder.core.context import Context
from builder.core.engine import Engine
from builder.core.errors import BuildError, CommandFailed, KilnError, RegistryError
from builder.core.run import run
from builder.core.state import StateDir
from builder.core.versions import release_version
from builder.keys.device_files import signed_identity
from builder.keys.release_key import SigningKey, stop_agent
from builder.keys.tuf_keys import has_trust_keys
from builder.release import trust
from builder.release.signing import (
    Access,
    Verifier,
    finalize_lookaside_dir,
    make_signature,
    make_verifier,
    raw_manifest,
    read_manifest,
)
from builder.spec.names import finalize_destination
from kiln_device.contract import LABEL_COMPATIBLE, LABEL_MIN_VERSION

STAGING_PREFIX = "staging-"


def is_loopback(registry: str) -> bool:
    host = registry.split("/", 1)[0].rsplit(":", 1)[0]
    return host == "localhost" or host.startswith("127.")


def finalize_tls_verify(registry: str, tls_verify: bool | None) -> bool:
    """Verify TLS unless told otherwise, except for a registry on the loopback (a test or dev one)."""
    return (not is_loopback(registry)) if tls_verify is None else tls_verify


def find_built_image(record: dict[str, Any], eng: Engine) -> str:
    """The recorded image id, checked to be still in the engine's store."""
    image_id = str(record["image"]["id"])
    if not eng.exists(image_id):
        raise BuildError(f"image {image_id[:19]} of {record['class']} {record['version']} is not in "
                         f"{eng.name}'s store any more; rebuild it")
    return image_id


def push_build(
    ctx: Context,
    cls: str,
    version: str,
    registry: str,
    *,
    tls_verify: bool | None = None,
    authfile: Path | None = None,
    cert_dir: Path | None = None,
) -> dict[str, Any]:
    """Push a built image by its id; record `{ref, digest}` in build.json. Returns the record."""
    record = records.read_record(cls, version)
    steps, eng = ctx.steps, ctx.engine
    eng.version()
    dest = finalize_destination(registry, cls, version)
    verify = finalize_tls_verify(registry, tls_verify)
    image_id = find_built_image(record, eng)
    with steps.step(f"push {dest}"):
        digest = eng.push(image_id, dest, tls_verify=verify, authfile=authfile, cert_dir=cert_dir)
    record["pushed"] = [p for p in record.get("pushed", []) if p.get("ref") != dest]
    record["pushed"].append({"ref": dest, "digest": digest, "byDigest": f"{dest.rsplit(':', 1)[0]}@{digest}"})
    record.setdefault("durations", {})[f"push {dest}"] = steps.summary().get(f"push {dest}")
    records.write_record(record)
    return record


def promote(repo: str, digest: str, tag: str, verifier: Verifier, *, access: Access, state: StateDir) -> None:
    """Point repo:tag at repo@digest, only if its published signature passes the device policy."""
    try:
        run(["skopeo", *verifier.args(), "copy", "--preserve-digests", "--remove-signatures", "--quiet",
             *access.args("src-", "dest-"), f"docker://{repo}@{digest}", f"docker://{repo}:{tag}"],
            env=state.engine_env(), capture=True)
    except CommandFailed as exc:
        raise RegistryError(f"promoting {repo}@{digest[:19]} to :{tag}: {exc}") from exc


def tag_digest(repo: str, tag: str, *, access: Access, state: StateDir) -> str | None:
    """The manifest digest REPO:TAG points at in the registry; None when there is no such tag."""
    try:
        raw = raw_manifest(f"{repo}:{tag}", access=access, state=state)
    except CommandFailed as exc:
        if re.search(r"manifest unknown|not found|NAME_UNKNOWN|MANIFEST_UNKNOWN", str(exc), re.IGNORECASE):
            return None
        raise RegistryError(f"reading {repo}:{tag}: {exc}") from exc
    return f"sha256:{hashlib.sha256(raw).hexdigest()}"


def check_immutable(repo: str, tag: str, digest: str, *, cls: str, version: str, channel: str | None,
                    key: SigningKey, lookaside_dir: Path, access: Access, state: StateDir) -> None:
    """Refuse, before any tag moves, a VERSION that the registry or the channel's TUF targets already hold
    with another digest: a released version never changes digest."""
    held = tag_digest(repo, tag, access=access, state=state)
    if held is not None and held != digest:
        raise RegistryError(f"{cls} {version} is already in {repo} as {held}; this build is {digest}: a released "
                            "version never changes digest", hint="release the change under a new version")
    if channel and has_trust_keys(key.directory):
        tuf = trust.open_repository(lookaside_dir, None)  # read only: no signing key is loaded to read targets
        if tuf.exists():
            found = tuf.latest("targets").signed.targets.get(trust.target_path(cls, channel, version))
            if found is not None and f"sha256:{found.hashes.get('sha256')}" != digest:
                raise RegistryError(f"{cls} {version} is already released on {channel} as "
                                    f"sha256:{found.hashes.get('sha256')}; this build is {digest}: a released version "
                                    "never changes digest", hint="release the change under a new version")


def push_signed(
    ctx: Context,
    cls: str,
    version: str,
    registry: str,
    *,
    key: SigningKey,
    lookaside_dir: Path | None = None,
    channel: str | None = None,
    tls_verify: bool | None = None,
    authfile: Path | None = None,
    cert_dir: Path | None = None,
    rollout_policy: dict[str, Any] | None = None,
    attest: bool = False,
) -> dict[str, Any]:
    """Push a built CLASS VERSION signed: staging tag, sign, promote to :VERSION (and :CHANNEL), name it in
    the channel's TUF targets and start its rollout at wave 1 (ROLLOUT_POLICY: builder.release.rollout.policy).
    With ATTEST, the signed SBOM and provenance go beside the image first (builder.release.attest): a release
    whose attestations fail moves no tag.

    Returns the build record with `pushed` and `signatures` updated (also written)."""
    record = records.read_record(cls, version)
    state, steps, eng = ctx.state, ctx.steps, ctx.engine
    eng.version()
    lookaside_dir = (lookaside_dir or finalize_lookaside_dir(state)).absolute()
    verify = finalize_tls_verify(registry, tls_verify)
    access = Access(verify, authfile, cert_dir)
    tag = release_version(version).tag
    dest = finalize_destination(registry, cls, version)
    repo = dest.rsplit(":", 1)[0]
    image_id = find_built_image(record, eng)
    verifier = make_verifier(state, cls, key, lookaside_dir, registry.removeprefix("docker://"))
    try:
        with steps.step(f"push {repo}:{STAGING_PREFIX}{tag}"):
            digest = eng.push(image_id, f"{repo}:{STAGING_PREFIX}{tag}", tls_verify=verify,
                              authfile=authfile, cert_dir=cert_dir)
        check_immutable(repo, tag, digest, cls=cls, version=version, channel=channel, key=key,
                        lookaside_dir=lookaside_dir, access=access, state=state)
        # What a device downloads: the compressed sizes the registry holds (the release report reads them).
        pushed = json.loads(read_manifest(repo, digest, access=access, state=state))
        record["manifest"] = {"digest": digest, "config": int(pushed["config"]["size"]),
                              "layers": [{"digest": la["digest"], "size": int(la["size"])}
                                         for la in pushed.get("layers") or []]}
        with steps.step(f"sign {digest[:19]} with {key.fingerprint[-16:]}"):
            sig = make_signature(repo, digest, tag, cls=cls, key=key, lookaside_dir=lookaside_dir,
                                 access=access, state=state)
        if attest:
            from builder.release import attest as attestation

            with steps.step("read the image's package database"):
                status = attestation.release_dpkg_status(eng, record)
            with steps.step(f"SBOM and provenance of {digest[:19]}: push and sign"):
                record["attestations"] = attestation.attest(record, repo, digest, status, key=key,
                                                            lookaside_dir=lookaside_dir, access=access, state=state)
        tags = [tag] + ([channel] if channel else [])
        for t in tags:
            with steps.step(f"promote to :{t}"):
                promote(repo, digest, t, verifier, access=access, state=state)
    except KilnError as exc:
        raise exc.with_context(f"releasing {cls} {version} to {registry}") from exc.__cause__
    finally:
        stop_agent(key)
    record["pushed"] = [p for p in record.get("pushed", []) if p.get("ref") not in {f"{repo}:{t}" for t in tags}]
    record["pushed"] += [{"ref": f"{repo}:{t}", "digest": digest, "byDigest": f"{repo}@{digest}", "signed": True}
                         for t in tags]
    record["signatures"] = [s for s in record.get("signatures", []) if s.get("digest") != digest] + [{
        "digest": digest, "fingerprint": key.fingerprint, "identity": f"{signed_identity(cls)}:{tag}",
        "path": str(sig), "lookaside": str(lookaside_dir)}]
    if channel and has_trust_keys(key.directory):
        with steps.step(f"name {version} in the {channel} channel's TUF targets"):
            manifest = read_manifest(repo, digest, access=access, state=state)
            labels = record.get("labels") or {}
            compatible = record.get("compatible") or labels.get(LABEL_COMPATIBLE)
            if not compatible:
                raise RegistryError(f"the build record of {cls} {version} does not say what it is compatible with "
                                    f"(no compatible, no {LABEL_COMPATIBLE} label): rebuild it")
            release = trust.Release(cls, channel, version, digest, len(manifest), compatible,
                                    labels.get(LABEL_MIN_VERSION) or None, repo.split("/", 1)[1])
            tuf_repo = trust.publish_release(lookaside_dir, key.directory, release)
        entry: dict[str, Any] = {"channel": channel, "target": release.path, "digest": digest,
                                 "targetsVersion": tuf_repo.latest("targets").signed.version,
                                 "repository": str(tuf_repo.dir)}
        if rollout_policy is not None and "rollout" in tuf_repo.keys.signers:
            from builder.release import rollout

            with steps.step(f"start the rollout of {version} on {channel} (wave 1)"):
                entry["rollout"] = rollout.start(tuf_repo, cls, channel, version, rollout_policy)
        record["channels"] = [c for c in record.get("channels", []) if c.get("channel") != channel] + [entry]
    record.setdefault("durations", {}).update(steps.summary())
    records.write_record(record)
    return record
