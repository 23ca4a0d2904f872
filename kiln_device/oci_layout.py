"""The OCI layout on the data partition, read the same way by the agent and by the builder's factory
disk (builder.disk.layer_store): descriptors and manifests by ref, blobs by digest (checked), the
labels of a verified image, what an interrupted copy leaves, garbage collection."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln_device.common import read_json, sha256_file, write_atomic
from kiln_device.contract import ANNOTATION_REF_NAME, WRITE_FAILED
from kiln_device.errors import AgentError, log


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

