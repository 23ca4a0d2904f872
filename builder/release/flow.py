"""`kiln release`: build (or take the built) CLASS VERSION, then push it signed and move its tags.

    record = make_release(ctx, hc, source="images/qemu-x86_64.yaml", version="1.1.0",
                          registry="127.0.0.1:5000", key=resolve_signing_key(hc, None))

The decisions live here, not in the CLI: whether the version must be built (never
built, gone from the engine's store, or `rebuild`), and whether the key may sign it
(an image trusts one release key; a signature by another would strand its devices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.core import records
from builder.core.context import Context
from builder.core.errors import BuildError, UsageError
from builder.image.build import build_class
from builder.keys.release_key import SigningKey
from builder.release.publish import push_signed
from builder.release.rollout import policy
from builder.spec.schema import HardwareClass


def needs_build(ctx: Context, cls: str, version: str) -> bool:
    """True unless VERSION has a build record whose image is still in the engine's store."""
    try:
        record = records.read_record(cls, version)
    except BuildError:
        return True
    return not ctx.engine.exists(record["image"]["id"])


def check_trusted_key(record: dict[str, Any], key: SigningKey) -> None:
    """The image must trust KEY: devices running it verify its successors with the key baked in."""
    trusted = (record.get("releaseKey") or {}).get("fingerprint")
    if trusted != key.fingerprint:
        raise UsageError(f"{record['class']} {record['version']} was built trusting release key {trusted}, not "
                         f"{key.fingerprint}: devices running it would refuse this signature's successors; "
                         "rebuild with --rebuild, or sign with the key it trusts")


def finalize_channel(default: str, channel: str | None) -> str:
    """--channel, else DEFAULT (the class's rollout.channel)."""
    if channel is not None and not channel.strip():
        raise UsageError("--channel must not be empty")
    return channel or default


def make_release(
    ctx: Context,
    hc: HardwareClass,
    *,
    source: str,
    version: str,
    registry: str,
    key: SigningKey,
    channel: str | None = None,
    lookaside_dir: Path | None = None,
    rebuild: bool = False,
    tls_verify: bool | None = None,
    authfile: Path | None = None,
    cert_dir: Path | None = None,
) -> dict[str, Any]:
    """Build when needed, check the key, push signed to :VERSION and the channel; the updated record."""
    channel = finalize_channel(hc.spec.rollout.channel, channel)
    if rebuild or needs_build(ctx, hc.name, version):
        record = build_class(ctx, hc, source=source, version=version, sign_key=key.directory)
    else:
        record = records.read_record(hc.name, version)
    check_trusted_key(record, key)
    r = hc.spec.rollout
    rollout_policy = policy([{"percent": s.percent, "soakHours": s.soak_hours} for s in r.stages],
                            r.max_failure_rate, r.halt_min_devices, r.auto_promote)
    return push_signed(ctx, hc.name, version, registry, key=key, lookaside_dir=lookaside_dir, channel=channel,
                       tls_verify=tls_verify, authfile=authfile, cert_dir=cert_dir,
                       rollout_policy=rollout_policy, attest=True)
