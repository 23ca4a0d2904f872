"""What the device and the fleet service agree on (stdlib only): device ids, the report protocol,
and the rollout waves.

Device keys (KEY_TYPES): an ed25519 key (a file on the device), or an ECDSA P-256 key made and
kept by the device's TPM (which has no ed25519). Enrollment says which (`keyType`, ed25519 when
absent). The public key travels as base64 of its bytes: the raw 32 bytes for ed25519, the DER
SubjectPublicKeyInfo for P-256.

Device id: "kd-" and the first 24 hex digits of the sha256 of those public key bytes. A device
names itself by its key, so it cannot report under another device's id without that device's
key.

Reports: a POST whose body is JSON and whose `Kiln-Signature` header is the base64 signature, by
the device key, of SIGNING_CONTEXT + the body's bytes (ed25519; or ECDSA with SHA-256, DER). The body carries the
device id and a `counter` that grows with every request the device sends (kept in its
outbox's meta.json, saved before sending): the service refuses a counter it has seen
(a replayed request), while the events themselves are stored once per (device, seq), so a
retry with a new counter after a lost answer stores nothing twice.

Waves: a device's place in the fleet is a number in [0, 100) from a stable hash of its id.
A rollout with stages of cumulative percent P1 < P2 < ... < 100 puts a device in the first
wave whose percent is above that number. The rollout's signed state (the `rollout` target of
its channel, docs/fleet.md) says how many waves are open and whether it is halted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from kiln_device.channel import Rollout
from kiln_device.contract import MAX_BATCH

SIGNING_CONTEXT = b"kiln-fleet-report-v1\n"
ENROLL_CONTEXT = b"kiln-fleet-enroll-v1\n"
SIGNATURE_HEADER = "Kiln-Signature"
DEVICE_HEADER = "Kiln-Device"
MAX_BODY = 1024 * 1024  # bytes: one upload
MAX_EVENTS = MAX_BATCH  # per upload (agent.json fleet.batch is at most this)
MAX_EVENT_BYTES = 16 * 1024
ID_PREFIX = "kd-"
KEY_ED25519 = "ed25519"
KEY_ECDSA_P256 = "ecdsa-p256"
KEY_TYPES = (KEY_ED25519, KEY_ECDSA_P256)

# Kinds of events the agent sends (the service also keeps kinds it does not know: a newer agent's).
EVENT_KINDS = {
    "boot": "a boot: version, slot, degraded, secureBoot (the firmware's state), rootDigest (the layer list the "
            "signed UKI binds)",
    "update.started": "an update began: version, from",
    "update.phase": "a journaled phase of an update: version, phase",
    "update.downloaded": "download-only: fetched, waiting for the maintenance window",
    "update.installed": "the new slot is written; the trial boot is next",
    "update.failed": "an update failed before its trial boot: version, code, reason",
    "update.success": "the trial boot was blessed: version, previous",
    "rollback": "the trial boot did not stick: version, reason",
    "channel.stale": "the channel's metadata expired or did not verify: status, code, reason",
    "channel.fresh": "the channel's metadata verifies again",
    "rollout.waiting": "the rollout holds this device back: version, reason",
    "inference.latency": "inference latency over the last 1,000 requests (ms): count, total, errors, p50, p95, p99, "
                         "window",
}
FAILURE_KINDS = ("update.failed", "rollback")


def device_id(public_key: bytes) -> str:
    return ID_PREFIX + hashlib.sha256(public_key).hexdigest()[:24]


def is_device_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == len(ID_PREFIX) + 24 and value.startswith(ID_PREFIX) and \
        all(c in "0123456789abcdef" for c in value[len(ID_PREFIX):])


def place(device: str) -> float:
    """The device's stable place in [0, 100): which wave it is in."""
    digest = hashlib.sha256(b"kiln-wave\n" + device.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def wave_of(device: str, percents: Sequence[float]) -> int:
    """1-based wave of DEVICE under stages of these cumulative PERCENTS."""
    where = place(device)
    for n, percent in enumerate(percents, 1):
        if where < float(percent):
            return n
    return len(percents)


def rollout_gate(device: str, rollout: Rollout | None, version: str) -> str | None:
    """None when DEVICE may install VERSION under the ROLLOUT state, else why not."""
    if rollout is None:
        return None  # no rollout in this channel: every release is open to every device (releases before fleets)
    percents = [s.percent for s in rollout.stages]
    if rollout.version != version:
        # A release whose rollout was replaced before it finished: open to the waves it reached, and only if
        # it was not halted (no device falls back to a halted release).
        closed = next((c for c in rollout.closed if c.version == version), None)
        if closed is None:
            return None  # its rollout finished (or it never had one)
        if closed.halted:
            return f"the rollout of {version} was halted and replaced by {rollout.version}"
        if wave_of(device, percents) > closed.wave:
            return f"the rollout of {version} was replaced by {rollout.version} before this device's wave"
        return None
    if rollout.halted is not None:
        return f"the rollout of {version} is halted: {rollout.halted.reason}"
    opened = rollout.wave
    mine = wave_of(device, percents)
    if mine > opened:
        return (f"the rollout of {version} has opened wave {opened} of {len(percents)} "
                f"({percents[opened - 1] if opened else 0}% of devices); this device is in wave {mine}")
    return None
