"""What is in a released image (a CycloneDX SBOM) and how it was built (an in-toto SLSA provenance statement),
each pushed beside the image as a signed OCI artifact, and `kiln verify` that checks all three against a digest.

    docs = attest(ctx, record, repo, digest, key=key, lookaside_dir=..., access=...)   # kiln release does this
    report = verify_image("127.0.0.1:5000/kiln/qemu-x86_64:1.0.0", public_key=..., lookaside=...)

Where they live (the tag convention cosign uses; docs/release.md): for an image REPO@sha256:HEX,

    REPO:sha256-HEX.sbom   an OCI artifact (artifactType application/vnd.cyclonedx+json) whose one blob is the SBOM
    REPO:sha256-HEX.att    an OCI artifact (artifactType application/vnd.in-toto+json), the provenance statement

Each artifact manifest names the image as its `subject`, and is signed like the image: a containers
simple signing signature by the release key, in the lookaside directory, for the identity
`release.kiln.invalid/kiln/CLASS:<its tag>`. An auditor or a device fetches them by the image's digest
alone. The documents are deterministic (a released version never changes digest: neither do they).

The SBOM (CycloneDX 1.6, made with cyclonedx-python-lib and validated against its schema) lists the
image's dpkg packages with versions (read from the image's /var/lib/dpkg/status), the runtime and agent
wheels with their SHA-256 (the hash-locked requirements the image installed), each model with its digest,
precision and gate result, the kernel, the base OS and the driver where there is one.

The provenance is an in-toto Statement v1 with a SLSA provenance v1 predicate: the builder (Kiln and its
version, the engine), the build parameters (class, version, architecture, engine), the spec's digest (the
resolved class.json the image carries), the base image id, the wheels and models as resolved dependencies,
and the source revision.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import __version__
from builder.core.errors import CommandFailed, KilnError, RegistryError, UsageError
from builder.core.run import run
from builder.core.state import StateDir
from builder.keys.device_files import signed_identity
from builder.keys.release_key import SigningKey
from builder.release.signing import Access, make_signature, signature_path

SBOM, PROVENANCE = "sbom", "att"
MEDIA = {SBOM: "application/vnd.cyclonedx+json", PROVENANCE: "application/vnd.in-toto+json"}
TITLES = {SBOM: "sbom.cdx.json", PROVENANCE: "provenance.intoto.json"}
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
SLSA_PREDICATE = "https://slsa.dev/provenance/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
BUILD_TYPE = "https://kiln.dev/build/v1"
DPKG_STATUS = "/var/lib/dpkg/status"
NAMESPACE = uuid.UUID("6f1b3c8e-6a4e-4c55-9d53-6b696c6e0001")  # the SBOM's serial number: uuid5 of the image digest


class AttestError(KilnError):
    exit_code = 7  # what the image holds cannot be described (a build-side problem)


def artifact_tag(digest: str, kind: str) -> str:
    return f"{digest.replace(':', '-')}.{kind}"


# --- what goes in ------------------------------------------------------------------------------


def parse_dpkg_status(status: bytes) -> list[dict[str, str]]:
    """The installed packages of a dpkg status file: name, version, architecture, source (sorted by name)."""
    out = []
    for stanza in status.decode(errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if fields.get("Package") and "installed" in fields.get("Status", "").split():
            out.append({"name": fields["Package"], "version": fields.get("Version", ""),
                        "architecture": fields.get("Architecture", ""), "source": fields.get("Source", "")})
    return sorted(out, key=lambda p: (p["name"], p["architecture"]))


def parse_requirements(text: str) -> list[dict[str, str]]:
    """name==version --hash=sha256:HEX lines (the hash-locked requirements Kiln writes)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, _, rest = line.partition(" ")
        name, _, version = spec.partition("==")
        hashes = [h.split("sha256:", 1)[1] for h in rest.split() if h.startswith("--hash=sha256:")]
        out.append({"name": name, "version": version, "sha256": hashes[0] if hashes else ""})
    return out


@dataclass(frozen=True)
class Inputs:
    """Everything the documents say, read from the build record, its context and the image."""

    record: dict[str, Any]
    digest: str  # the image's manifest digest in the registry
    packages: list[dict[str, str]]
    wheels: dict[str, list[dict[str, str]]]  # "runtime"/"agent" -> locked wheels
    reports: dict[str, dict[str, Any]]  # model name -> its gate report
    spec_sha256: str


def gather(record: dict[str, Any], digest: str, dpkg_status: bytes) -> Inputs:
    context = Path(record["context"])
    wheels = {}
    for group in ("runtime", "agent"):
        req = context / group / "requirements.txt"
        wheels[group] = parse_requirements(req.read_text()) if req.is_file() else []
    reports = {}
    for m in record.get("models") or []:
        rep = context / "models" / m["name"] / m["version"] / "report.json"
        if rep.is_file():
            reports[m["name"]] = json.loads(rep.read_text())
    spec = context / "release" / "class.json"
    if not spec.is_file():
        raise AttestError(f"{spec}: the build context lacks the resolved spec; rebuild {record['class']} "
                          f"{record['version']}")
    return Inputs(record, digest, parse_dpkg_status(dpkg_status), wheels, reports,
                  hashlib.sha256(spec.read_bytes()).hexdigest())


def gate_result(report: dict[str, Any] | None) -> str:
    if not report:
        return "not gated (precision fixed by the spec)"
    chosen = next((c for c in report.get("candidates") or [] if c.get("name") == report.get("chosen")), None)
    reasons = "; ".join(report.get("reasons") or [])
    if chosen is None:
        return reasons or "no candidate chosen"
    return f"passed: {report['chosen']} ({reasons})"


# --- the SBOM ------------------------------------------------------------------------------------


def make_sbom(inp: Inputs) -> bytes:
    """CycloneDX 1.6 JSON, validated against the schema."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from packageurl import PackageURL

    rec = inp.record
    cls, version = rec["class"], rec["version"]
    contents = rec.get("contents") or {}
    labels = rec.get("labels") or {}
    arch = labels.get("dev.kiln.base.arch") or labels.get("dev.kiln.architecture") or ""
    deb_arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)
    hexdigest = inp.digest.removeprefix("sha256:")
    image = Component(
        type=ComponentType.CONTAINER, name=f"kiln/{cls}", version=version, bom_ref=f"image:{inp.digest}",
        purl=PackageURL("oci", None, cls, inp.digest, {"repository_url": f"kiln/{cls}"}),
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=hexdigest)],
        properties=[Property(name="kiln:class", value=cls), Property(name="kiln:image:digest", value=inp.digest),
                    Property(name="kiln:compatible", value=str(rec.get("compatible") or "")),
                    Property(name="kiln:revision", value=str(rec.get("revision") or ""))])
    created = labels.get("org.opencontainers.image.created") or rec.get("created") or "1970-01-01T00:00:00Z"
    from datetime import datetime

    # CycloneDX 1.5+: the tool that made the SBOM is a component (the `tools` list form is deprecated)
    tools = ToolRepository(components=[Component(type=ComponentType.APPLICATION, group="kiln", name="kiln",
                                                 version=__version__, bom_ref="tool:kiln")])
    bom = Bom(serial_number=uuid.uuid5(NAMESPACE, inp.digest),
              metadata=BomMetaData(component=image, tools=tools,
                                   timestamp=datetime.fromisoformat(created.replace("Z", "+00:00"))))
    release = labels.get("dev.kiln.base.release") or "bookworm"
    bom.components.add(Component(type=ComponentType.OPERATING_SYSTEM, name="debian", version=release,
                                 bom_ref="os:debian",
                                 properties=[Property(name="kiln:base:id", value=str((rec.get("base") or {})
                                                                                      .get("id") or "")),
                                             Property(name="kiln:base:mirror",
                                                      value=labels.get("dev.kiln.base.mirror") or ""),
                                             Property(name="kiln:base:snapshot",
                                                      value=labels.get("dev.kiln.base.snapshot") or "")]))
    if contents.get("kernel"):
        bom.components.add(Component(type=ComponentType.OPERATING_SYSTEM, name="linux", version=contents["kernel"],
                                     bom_ref="kernel", description="the kernel the image boots"))
    driver = contents.get("driver")
    if driver:
        bom.components.add(Component(type=ComponentType.DEVICE_DRIVER, name=driver["name"],
                                     version=str(driver["version"]), bom_ref=f"driver:{driver['name']}",
                                     properties=[Property(name="kiln:driver:packages",
                                                          value=" ".join(driver.get("packages") or []))]))
    for p in inp.packages:
        pa = p["architecture"] if p["architecture"] != "all" else "all"
        bom.components.add(Component(
            type=ComponentType.LIBRARY if p["name"].startswith("lib") else ComponentType.APPLICATION,
            name=p["name"], version=p["version"], bom_ref=f"deb:{p['name']}:{pa}",
            purl=PackageURL("deb", "debian", p["name"], p["version"], {"arch": pa or deb_arch}),
            properties=[Property(name="kiln:source", value="dpkg")]))
    for group, wheels in inp.wheels.items():
        for w in wheels:
            bom.components.add(Component(
                type=ComponentType.LIBRARY, name=w["name"], version=w["version"],
                bom_ref=f"pypi:{group}:{w['name']}",
                purl=PackageURL("pypi", None, w["name"].lower(), w["version"]),
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=w["sha256"])] if w["sha256"] else [],
                properties=[Property(name="kiln:venv", value=group)]))
    for m in rec.get("models") or []:
        report = inp.reports.get(m["name"])
        bom.components.add(Component(
            type=ComponentType.MACHINE_LEARNING_MODEL, name=m["name"], version=m["version"],
            bom_ref=f"model:{m['name']}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=m["sha256"].removeprefix("sha256:"))],
            properties=[Property(name="kiln:model:precision", value=m["precision"]),
                        Property(name="kiln:model:gate", value=gate_result(report)),
                        Property(name="kiln:model:source-sha256",
                                 value=str((report or {}).get("source_sha256") or ""))]))
    bom.register_dependency(image, list(bom.components))  # the image contains every component
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        raise AttestError(f"the SBOM of {cls} {version} does not validate against CycloneDX 1.6: {error}")
    return canonical(json.loads(text))


def canonical(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# --- the provenance ------------------------------------------------------------------------------


def make_provenance(inp: Inputs, repo: str) -> bytes:
    rec = inp.record
    labels = rec.get("labels") or {}
    engine = rec.get("engine") or {}
    deps: list[dict[str, Any]] = [
        {"uri": f"kiln:spec/{rec['class']}/class.json", "digest": {"sha256": inp.spec_sha256}},
        {"uri": f"oci:{(rec.get('base') or {}).get('ref', '')}",
         "digest": {"sha256": str((rec.get("base") or {}).get("id", "")).removeprefix("sha256:")}},
    ]
    for group, wheels in inp.wheels.items():
        deps += [{"uri": f"pkg:pypi/{w['name'].lower()}@{w['version']}", "digest": {"sha256": w["sha256"]},
                  "annotations": {"venv": group}} for w in wheels]
    deps += [{"uri": f"kiln:model/{m['name']}@{m['version']}",
              "digest": {"sha256": m["sha256"].removeprefix("sha256:")},
              "annotations": {"precision": m["precision"], "gate": gate_result(inp.reports.get(m["name"]))}}
             for m in rec.get("models") or []]
    if rec.get("revision"):
        deps.append({"uri": "git+kiln", "digest": {"gitCommit": str(rec["revision"])}})
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": repo, "digest": {"sha256": inp.digest.removeprefix("sha256:")}}],
        "predicateType": SLSA_PREDICATE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"class": rec["class"], "version": rec["version"],
                                       "source": labels.get("org.opencontainers.image.source", "")},
                "internalParameters": {"architecture": labels.get("dev.kiln.architecture", ""),
                                       "engine": engine.get("name"), "engineVersion": engine.get("version"),
                                       "reproducible": engine.get("reproducible"),
                                       "sourceDateEpoch": labels.get("org.opencontainers.image.created")},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": "https://kiln.dev/builder/kiln", "version": {"kiln": __version__}},
                "metadata": {"invocationId": f"{rec['class']}/{rec['version']}",
                             "startedOn": labels.get("org.opencontainers.image.created") or rec.get("created")},
            },
        },
    }
    return canonical(statement)


# --- OCI artifacts beside the image --------------------------------------------------------------


def oci_layout(directory: Path, kind: str, payload: bytes, subject: dict[str, Any]) -> str:
    """An OCI layout holding one artifact manifest (the payload as its one blob, SUBJECT its subject)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, Any]:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return {"digest": f"sha256:{h}", "size": len(data)}

    manifest = {
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA, "artifactType": MEDIA[kind],
        "config": {"mediaType": EMPTY_CONFIG, **blob(b"{}")},
        "layers": [{"mediaType": MEDIA[kind], **blob(payload),
                    "annotations": {"org.opencontainers.image.title": TITLES[kind]}}],
        "subject": subject,
        "annotations": {"dev.kiln.attestation": kind},
    }
    m = blob(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    (directory / "index.json").write_text(json.dumps(
        {"schemaVersion": 2, "manifests": [{"mediaType": MANIFEST_MEDIA, **m,
                                            "annotations": {"org.opencontainers.image.ref.name": kind}}]}))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return str(m["digest"])


def push_artifact(repo: str, tag: str, kind: str, payload: bytes, subject: dict[str, Any], *, access: Access,
                  state: StateDir) -> str:
    with tempfile.TemporaryDirectory(dir=state.tmp_dir) as tmp:
        digest = oci_layout(Path(tmp) / "layout", kind, payload, subject)
        try:
            run(["skopeo", "copy", "--quiet", "--preserve-digests", *access.args("dest-"),
                 f"oci:{Path(tmp) / 'layout'}:{kind}", f"docker://{repo}:{tag}"], env=state.engine_env(),
                capture=True)
        except CommandFailed as exc:
            raise RegistryError(f"pushing the {kind} of {subject['digest'][:19]} to {repo}:{tag}: {exc}") from exc
    return digest


def attest(record: dict[str, Any], repo: str, digest: str, dpkg_status: bytes, *, key: SigningKey,
           lookaside_dir: Path, access: Access, state: StateDir) -> dict[str, Any]:
    """Make, push and sign the SBOM and the provenance of REPO@DIGEST; what the build record keeps."""
    from builder.release.signing import read_manifest

    inp = gather(record, digest, dpkg_status)
    manifest = read_manifest(repo, digest, access=access, state=state)
    media = json.loads(manifest).get("mediaType") or MANIFEST_MEDIA
    subject = {"mediaType": media, "digest": digest, "size": len(manifest)}
    out: dict[str, Any] = {}
    for kind, payload in ((SBOM, make_sbom(inp)), (PROVENANCE, make_provenance(inp, repo))):
        tag = artifact_tag(digest, kind)
        art = push_artifact(repo, tag, kind, payload, subject, access=access, state=state)
        sig = make_signature(repo, art, tag, cls=record["class"], key=key, lookaside_dir=lookaside_dir,
                             access=access, state=state)
        out[kind] = {"tag": tag, "digest": art, "payloadSha256": hashlib.sha256(payload).hexdigest(),
                     "signature": str(sig), "fingerprint": key.fingerprint}
    out["sbomSummary"] = {"packages": len(inp.packages), "wheels": sum(len(w) for w in inp.wheels.values()),
                          "models": len(record.get("models") or []),
                          "kernel": (record.get("contents") or {}).get("kernel"),
                          "driver": ((record.get("contents") or {}).get("driver") or {}).get("name")}
    return out


def release_dpkg_status(engine: Any, record: dict[str, Any]) -> bytes:
    try:
        return bytes(engine.read_file(record["image"]["id"], DPKG_STATUS))
    except KilnError as exc:
        raise AttestError(f"{record['class']} {record['version']}: the image's package database {DPKG_STATUS} "
                          f"cannot be read ({exc}); the SBOM lists dpkg packages (rpm-based images: not yet)") from None


# --- kiln verify ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


def fetch(url_or_dir: str, rel: str) -> bytes | None:
    """A file of the lookaside (a directory or an http(s) URL); None when it is not there."""
    if url_or_dir.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{url_or_dir.rstrip('/')}/{rel}", timeout=30) as resp:  # noqa: S310
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise RegistryError(f"{url_or_dir}/{rel}: HTTP {exc.code}") from None
        except OSError as exc:
            raise RegistryError(f"{url_or_dir}: {exc}") from None
    path = Path(url_or_dir) / rel
    return path.read_bytes() if path.is_file() else None


def verify_signature(manifest: bytes, digest: str, identity: str, repo_path: str, lookaside: str,
                     gnupg: Path, fingerprint: str, tmp: Path) -> tuple[bool, str]:
    rel = str(signature_path(Path("."), repo_path, digest).relative_to("."))
    sig = fetch(lookaside, rel)
    if sig is None:
        return False, f"no signature at {lookaside}/{rel}"
    (tmp / "m").write_bytes(manifest)
    (tmp / "s").write_bytes(sig)
    try:
        run(["skopeo", "standalone-verify", tmp / "m", identity, fingerprint, tmp / "s"],
            env={"GNUPGHOME": str(gnupg)}, capture=True, quiet=True)
    except CommandFailed as exc:
        return False, f"the signature does not verify: {exc.stderr_tail.splitlines()[-1] if exc.stderr_tail else exc}"
    return True, f"signed by {fingerprint[-16:]} as {identity}"


def verify_image(image: str, *, public_key: Path, lookaside: str, access: Access, state: StateDir) -> dict[str, Any]:
    """Check IMAGE's signature, its SBOM and its provenance (signatures, subjects, contents) against its digest.
    Every check is reported; `ok` is whether all passed."""
    ref = image.removeprefix("docker://")
    repo, digest, tag = split_ref(ref)
    repo_path = repo.split("/", 1)[1]
    cls = repo_path.rsplit("/", 1)[-1]
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(dir=state.tmp_dir) as t:
        tmp = Path(t)
        gnupg = tmp / "gnupg"
        gnupg.mkdir(mode=0o700)
        try:
            run(["gpg", "--batch", "--quiet", "--import", public_key], env={"GNUPGHOME": str(gnupg)}, capture=True,
                quiet=True)
            listing = run(["gpg", "--batch", "--with-colons", "--list-keys"], env={"GNUPGHOME": str(gnupg)},
                          capture=True, quiet=True).stdout.decode()
        except CommandFailed as exc:
            raise UsageError(f"{public_key}: not a GPG public key: {exc}") from None
        fingerprint = next((ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:")), "")
        manifest = raw_manifest(f"{repo}@{digest}" if digest else f"{repo}:{tag}", access, state)
        actual = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        if digest and actual != digest:
            raise RegistryError(f"{repo}@{digest}: the registry returned a manifest with another digest")
        digest = actual
        # Releases are signed as :VERSION (a channel tag like :stable points at the same digest): the version
        # the image says it is names the identity its signature must carry.
        try:
            config = json.loads(run(["skopeo", "inspect", "--config", *access.args(""), f"docker://{repo}@{digest}"],
                                    env=state.engine_env(), capture=True, quiet=True).stdout)
        except (CommandFailed, ValueError) as exc:
            raise RegistryError(f"{repo}@{digest[:19]}: its config cannot be read ({exc})") from None
        labels = ((config.get("config") or {}).get("Labels") or {}) if isinstance(config, dict) else {}
        tag = str(labels.get("org.opencontainers.image.version") or tag)
        ok, why = verify_signature(manifest, digest, f"{signed_identity(cls)}:{tag}", repo_path, lookaside, gnupg,
                                   fingerprint, tmp)
        checks.append(Check("image signature", ok, why))
        docs: dict[str, Any] = {}
        for kind in (SBOM, PROVENANCE):
            atag = artifact_tag(digest, kind)
            try:
                art = raw_manifest(f"{repo}:{atag}", access, state)
            except RegistryError as exc:
                checks.append(Check(f"{kind} present", False, str(exc)))
                continue
            adigest = f"sha256:{hashlib.sha256(art).hexdigest()}"
            ok, why = verify_signature(art, adigest, f"{signed_identity(cls)}:{atag}", repo_path, lookaside, gnupg,
                                       fingerprint, tmp)
            checks.append(Check(f"{kind} signature", ok, why))
            if not ok:  # nothing unsigned is read any further
                continue
            try:
                m = json.loads(art)
                subject = (m.get("subject") or {}).get("digest")
                checks.append(Check(f"{kind} subject", subject == digest, f"names {subject}"))
                [layer] = m["layers"]
                payload = fetch_payload(repo, adigest, str(layer["digest"]), access, state, tmp)
                if hashlib.sha256(payload).hexdigest() != str(layer["digest"]).removeprefix("sha256:"):
                    raise ValueError("the blob does not match its digest")
                doc = json.loads(payload)
                if not isinstance(doc, dict):
                    raise ValueError("not a JSON object")
                docs[kind] = doc
            except (ValueError, KeyError, TypeError, AttributeError, OSError, KilnError) as exc:
                checks.append(Check(f"{kind} content", False, f"unreadable: {exc}"))
        if SBOM in docs:
            try:
                props = {p["name"]: p["value"] for p in docs[SBOM]["metadata"]["component"].get("properties") or []}
            except (KeyError, TypeError, AttributeError):
                props = {}
            checks.append(Check("sbom names the image", props.get("kiln:image:digest") == digest,
                                f"kiln:image:digest {props.get('kiln:image:digest')}"))
        if PROVENANCE in docs:
            try:
                subj = docs[PROVENANCE]["subject"][0]["digest"]["sha256"]
            except (KeyError, TypeError, IndexError):
                subj = None
            checks.append(Check("provenance names the image", f"sha256:{subj}" == digest, f"subject sha256:{subj}"))
            checks.append(Check("provenance type", docs[PROVENANCE].get("predicateType") == SLSA_PREDICATE,
                                str(docs[PROVENANCE].get("predicateType"))))
    return {"image": f"{repo}@{digest}", "tag": tag, "fingerprint": fingerprint,
            "checks": [c.__dict__ for c in checks],
            "ok": all(c.ok for c in checks) and SBOM in docs and PROVENANCE in docs,
            "sbom": summarize_sbom(docs.get(SBOM)), "provenance": docs.get(PROVENANCE)}


def summarize_sbom(sbom: dict[str, Any] | None) -> dict[str, Any] | None:
    if not sbom:
        return None
    comps = sbom.get("components") or []
    kinds: dict[str, int] = {}
    for c in comps:
        kinds[c.get("type", "?")] = kinds.get(c.get("type", "?"), 0) + 1
    return {"components": len(comps), "byType": dict(sorted(kinds.items())),
            "models": [c["name"] for c in comps if c.get("type") == "machine-learning-model"]}


def split_ref(ref: str) -> tuple[str, str, str]:
    """host/path[:tag][@sha256:...] -> (repo, digest or "", tag or "")."""
    digest = ""
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    last = ref.rsplit("/", 1)[-1]
    tag = ""
    if ":" in last:
        ref, tag = ref.rsplit(":", 1)
    if "/" not in ref or (not tag and not digest):
        raise UsageError(f"{ref}: expected REGISTRY/kiln/CLASS:TAG or REGISTRY/kiln/CLASS@sha256:DIGEST")
    return ref, digest, tag


def raw_manifest(ref: str, access: Access, state: StateDir) -> bytes:
    """signing.raw_manifest, its failure a RegistryError that `kiln verify` reports."""
    from builder.release.signing import raw_manifest as fetch_manifest

    try:
        return fetch_manifest(ref, access=access, state=state)
    except CommandFailed as exc:
        raise RegistryError(f"{ref}: {exc.stderr_tail.splitlines()[-1] if exc.stderr_tail else exc}") from None


def fetch_payload(repo: str, manifest_digest: str, blob: str, access: Access, state: StateDir, tmp: Path) -> bytes:
    """The payload blob of the artifact REPO@MANIFEST_DIGEST (skopeo checks every digest as it copies)."""
    out = tmp / f"artifact-{manifest_digest.removeprefix('sha256:')[:16]}"
    try:
        run(["skopeo", "copy", "--quiet", *access.args("src-"), f"docker://{repo}@{manifest_digest}", f"oci:{out}:x"],
            env=state.engine_env(), capture=True, quiet=True)
    except CommandFailed as exc:
        raise RegistryError(f"{repo}@{manifest_digest[:19]}: {exc}") from None
    return (out / "blobs" / "sha256" / blob.removeprefix("sha256:")).read_bytes()
