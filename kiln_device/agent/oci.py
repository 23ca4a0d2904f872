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
from kiln_device.common import read_json, write_atomic
from kiln_device.contract import ANNOTATION_REF_NAME, UNREACHABLE, WRITE_FAILED, oci_ref_name


def write_registries_d(config: Config) -> Path:
    """A registries.d telling skopeo where this registry's signatures are (runtime, not baked)."""
    d = config.state_dir / "registries.d"
    host = config.registry.split("/", 1)[0]
    write_atomic(d / "kiln.yaml", (f"# Written by kiln-agent from its configuration.\ndocker:\n"
                                   f"  {host}:\n    lookaside: {config.lookaside}\n").encode())
    return d


def skopeo(config: Config, *args: str, what: str, code: int, timeout: float | None = None) -> str:
    regd = write_registries_d(config)
    return run(["skopeo", "--policy", str(config.policy), "--registries.d", str(regd), *args],
               what=what, code=code, timeout=timeout)


def tls_flag(config: Config, side: str) -> list[str]:
    return [f"--{side}tls-verify=false"] if config.insecure else []


def inspect_channel(config: Config) -> Candidate:
    ref = f"{config.source}:{config.channel}"
    out = skopeo(config, "inspect", "--no-tags", *tls_flag(config, ""), "--retry-times", "2", ref,
                 what=f"reading {ref}", code=UNREACHABLE, timeout=120)
    try:
        data = json.loads(out)
        return candidate_from_labels(dict(data.get("Labels") or {}), str(data["Digest"]))
    except (ValueError, KeyError) as exc:
        raise AgentError(UNREACHABLE, f"reading {ref}: unexpected skopeo output: {exc}") from None


def fetch(config: Config, cand: Candidate, layout: Path) -> None:
    """skopeo copy by digest into the OCI layout: the signature is verified with the baked
    policy, blobs already in the layout are not downloaded again."""
    layout.mkdir(parents=True, exist_ok=True)
    for leftover in layout.glob("oci-put-blob*"):  # skopeo's temp blobs from a run that died mid-download
        log(f"removing {leftover.name} ({leftover.stat().st_size} bytes) left by an interrupted download")
        leftover.unlink()
    skopeo(config, "copy", *tls_flag(config, "src-"), "--retry-times", "3", "--remove-signatures",
           f"{config.source}@{cand.digest}", f"oci:{layout}:{oci_ref_name(cand.version)}",
           what=f"pulling {config.source}@{cand.digest[:19]}", code=UNREACHABLE)


def layout_manifest(layout: Path, ref: str) -> dict[str, Any]:
    index = read_json(layout / "index.json")
    for desc in index.get("manifests", []):
        if (desc.get("annotations") or {}).get(ANNOTATION_REF_NAME) == ref:
            return dict(read_json(blob_path(layout, desc["digest"])))
    raise AgentError(WRITE_FAILED, f"{layout}: no image named {ref}")


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
    if not index_path.exists():
        return 0
    index = read_json(index_path)
    kept = [d for d in index.get("manifests", []) if (d.get("annotations") or {}).get(ANNOTATION_REF_NAME) in keep]
    index["manifests"] = kept
    write_atomic(index_path, json.dumps(index).encode())
    live = set()
    for desc in kept:
        live.add(desc["digest"])
        manifest = read_json(blob_path(layout, desc["digest"]))
        live.add(manifest["config"]["digest"])
        live.update(layer["digest"] for layer in manifest.get("layers", []))
    freed = 0
    blobs = layout / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.is_dir() else []:
        if f"sha256:{blob.name}" not in live:
            freed += blob.stat().st_size
            blob.unlink()
    return freed
