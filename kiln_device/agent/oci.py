"""The registry: look up the channel, fetch by digest into the OCI layout on the data partition
(skopeo, signatures verified by the baked policy). The layout itself is kiln_device.oci_layout's."""

from __future__ import annotations

import json
from pathlib import Path

from kiln_device.agent.config import Config
from kiln_device.agent.versions import Candidate, candidate_from_labels
from kiln_device.common import fsync_dir, fsync_file, write_atomic
from kiln_device.contract import UNREACHABLE, WRITE_FAILED, oci_ref_name
from kiln_device.errors import AgentError, log
from kiln_device.oci_layout import corrupt_blobs, prepare_layout
from kiln_device.tools import run


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


def copy_image(config: Config, cand: Candidate, layout: Path, ref: str) -> None:
    """skopeo copy by digest: the signature is verified with the baked policy."""
    skopeo(config, "copy", *tls_flag(config, "src-"), "--retry-times", "3", "--remove-signatures",
           f"{config.source}@{cand.digest}", f"oci:{layout}:{ref}",
           what=f"pulling {config.source}@{cand.digest[:19]}", code=UNREACHABLE,
           timeout=config.timeouts.fetch, timeout_key="fetch")
    fsync_file(layout / "index.json")  # skopeo does not: make what it wrote survive a power cut
    fsync_dir(layout)

