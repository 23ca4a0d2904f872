"""The registry and the OCI layout on the data partition: look up the channel, fetch by digest
(skopeo, signatures verified by the baked policy), read verified labels, collect garbage."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln_device.agent.config import Config
from kiln_device.agent.errors import AgentError, log
from kiln_device.agent.tools import run
from kiln_device.agent.versions import Candidate, candidate_from_labels
from kiln_device.common import fsync_dir, fsync_file, read_json, sha256_file, write_atomic
from kiln_device.contract import ANNOTATION_REF_NAME, UNREACHABLE, WRITE_FAILED, oci_ref_name


def write_registries_d(config: Config) -> Path:
    """A registries.d telling skopeo where this registry's signatures are (runtime, not baked)."""
    d = config.state_dir / "registries.d"
    host = config.registry.split("/", 1)[0]
    write_atomic(d / "kiln.yaml", (f"# Written by kiln-agent from its configuration.\ndocker:\n"
                                   f"  {host}:\n    lookaside: {config.lookaside}\n").encode())
    return d


def skopeo(config: Config, *args: str, what: str, code: int, timeout: float, timeout_key: str) -> str:
    regd = write_registries_d(config)
    return run(["skopeo", "--policy", str(config.policy), "--registries.d", str(regd), *args],
               what=what, code=code, timeout=timeout, timeout_key=timeout_key)


def tls_flag(config: Config, side: str) -> list[str]:
    return [f"--{side}tls-verify=false"] if config.insecure else []


def inspect_channel(config: Config) -> Candidate:
    """The release the channel's tag names (an image without a TUF root: tags and signatures only)."""
    return inspect_ref(config, f"{config.source}:{config.channel}")


def inspect_ref(config: Config, ref: str) -> Candidate:
    """An image's labels and digest (REF by tag or @digest), checked before anything uses them."""
    out = skopeo(config, "inspect", "--no-tags", *tls_flag(config, ""), "--retry-times", "2", ref,
                 what=f"reading {ref}", code=UNREACHABLE, timeout=config.timeouts.check, timeout_key="check")
    try:
        data = json.loads(out)
        return candidate_from_labels(dict(data.get("Labels") or {}), str(data["Digest"]))
    except (ValueError, KeyError) as exc:
        raise AgentError(UNREACHABLE, f"reading {ref}: unexpected skopeo output: {exc}") from None


def fetch(config: Config, cand: Candidate, layout: Path) -> None:
    """The candidate, complete and intact, in the OCI layout under its ref name. Run on every
    attempt, a resumed one too: skopeo writes index.json without fsync (a power cut can leave it
    empty or stale), and a copy downloads only the blobs the layout lacks. Every blob the
    manifest names is hashed: skopeo reuses a blob that exists, corrupt or not, so corrupt ones
    are removed and fetched once more."""
    ref = oci_ref_name(cand.version)
    prepare_layout(layout)
    copy_image(config, cand, layout, ref)
    corrupt = corrupt_blobs(layout, ref, cand.digest)
    if corrupt:
        log(f"{len(corrupt)} blob(s) of {cand.version} in {layout} do not match their digests "
            f"({', '.join(p.name[:12] for p in corrupt)}); removing them and fetching them again")
        for blob in corrupt:
            blob.unlink(missing_ok=True)
        copy_image(config, cand, layout, ref)
        corrupt = corrupt_blobs(layout, ref, cand.digest)
    if corrupt:
        raise AgentError(WRITE_FAILED, f"{layout}: blob(s) {', '.join(p.name[:12] for p in corrupt)} of "
                                       f"{cand.version} are still corrupt after fetching them again "
                                       "(is the data partition failing?)")


def prepare_layout(layout: Path) -> None:
    """Remove what an interrupted copy leaves: skopeo's temp blobs, an index.json that does not parse."""
    layout.mkdir(parents=True, exist_ok=True)
    for leftover in layout.glob("oci-put-blob*"):  # skopeo's temp blobs from a run that died mid-download
        log(f"removing {leftover.name} ({leftover.stat().st_size} bytes) left by an interrupted download")
        leftover.unlink()
    index = layout / "index.json"
    if index.exists() and read_index(layout) is None:
        log(f"{index} is unreadable (a power cut during a download?); keeping it as index.json.corrupt, "
            "the blobs stay and the copy writes a new one")
        index.replace(layout / "index.json.corrupt")


def copy_image(config: Config, cand: Candidate, layout: Path, ref: str) -> None:
    """skopeo copy by digest: the signature is verified with the baked policy."""
    skopeo(config, "copy", *tls_flag(config, "src-"), "--retry-times", "3", "--remove-signatures",
           f"{config.source}@{cand.digest}", f"oci:{layout}:{ref}",
           what=f"pulling {config.source}@{cand.digest[:19]}", code=UNREACHABLE,
           timeout=config.timeouts.fetch, timeout_key="fetch")
    fsync_file(layout / "index.json")  # skopeo does not: make what it wrote survive a power cut
    fsync_dir(layout)


def read_index(layout: Path) -> dict[str, Any] | None:
    """The layout's index.json; None when it is missing or not an OCI index."""
    try:
        index = read_json(layout / "index.json")
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        return None
    return index


def layout_descriptor(layout: Path, ref: str) -> dict[str, Any]:
    index = read_index(layout)
    if index is None:
        raise AgentError(WRITE_FAILED, f"{layout}: index.json is missing or unreadable")
    for desc in index.get("manifests", []):
        if isinstance(desc, dict) and (desc.get("annotations") or {}).get(ANNOTATION_REF_NAME) == ref:
            return desc
    raise AgentError(WRITE_FAILED, f"{layout}: no image named {ref}")


def layout_manifest(layout: Path, ref: str) -> dict[str, Any]:
    return dict(read_json(blob_path(layout, layout_descriptor(layout, ref)["digest"])))


def corrupt_blobs(layout: Path, ref: str, digest: str) -> list[Path]:
    """The blobs of image `ref` (manifest, config, layers) that are missing or do not hash to their
    digest. The layout must name `digest` as `ref`."""
    named = layout_descriptor(layout, ref).get("digest")
    if named != digest:
        raise AgentError(WRITE_FAILED, f"{layout}: {ref} is {str(named)[:19]} after the copy, not {digest[:19]}")
    if not blob_intact(layout, digest):
        return [blob_path(layout, digest)]
    manifest = read_json(blob_path(layout, digest))
    wanted = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest.get("layers", []))]
    return [blob_path(layout, d) for d in dict.fromkeys(wanted) if not blob_intact(layout, d)]


def blob_intact(layout: Path, digest: str) -> bool:
    path = blob_path(layout, digest)
    return path.is_file() and f"sha256:{sha256_file(path)}" == digest


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise AgentError(WRITE_FAILED, f"bad digest {digest!r}")
    return layout / "blobs" / algo / hexd


def verified_labels(layout: Path, ref: str) -> dict[str, str]:
    manifest = layout_manifest(layout, ref)
    config = read_json(blob_path(layout, manifest["config"]["digest"]))
    return dict((config.get("config") or {}).get("Labels") or {})


def gc_layout(layout: Path, keep: Sequence[str]) -> int:
    """Drop images other than `keep` from the layout index and every blob they alone used."""
    index_path = layout / "index.json"
    index = read_index(layout)
    if index is None:
        return 0
    live, kept = set(), []
    for desc in index.get("manifests", []):
        if (desc.get("annotations") or {}).get(ANNOTATION_REF_NAME) not in keep:
            continue
        try:  # an entry whose manifest is gone (a stale index after a power cut) is dropped
            manifest = read_json(blob_path(layout, desc["digest"]))
            used = [desc["digest"], manifest["config"]["digest"], *(la["digest"] for la in manifest.get("layers", []))]
        except (OSError, ValueError, KeyError, TypeError, AgentError):
            continue
        kept.append(desc)
        live.update(used)
    index["manifests"] = kept
    write_atomic(index_path, json.dumps(index).encode())
    freed = 0
    blobs = layout / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.is_dir() else []:
        if f"sha256:{blob.name}" not in live:
            freed += blob.stat().st_size
            blob.unlink()
    return freed
