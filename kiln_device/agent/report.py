"""kiln-agent report: enroll with the fleet service once, then upload the outbox, oldest first.

Enrollment sends the device key (signed by it: proof that the device holds it), where the key lives
(`tpm` or `file`) and the device's serial. Once the service has answered, the enrollment token is
deleted: a device in the field carries none to copy. A new device may wait as pending until the
fleet's allow-list or an operator accepts it; its events stay in the outbox until then.

Runs from its own timer (kiln-agent-report.timer), never under the update lock: an update
or an inference never waits on the link. A failed upload backs off (30 s doubling to an
hour, with jitter, kept in the outbox's meta.json) and leaves every event in place; the
events the service acknowledges go. With no fleet service configured it does nothing.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import random
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kiln_device.agent.config import ROOT_ENV, Config
from kiln_device.agent.identity import Identity, load_or_create
from kiln_device.agent.outbox import Event, Outbox, emit
from kiln_device.common import fsync_dir, read_json
from kiln_device.contract import CONFIG, INFERENCE_STATUS, OK, UNREACHABLE, WAITING, Release, under
from kiln_device.errors import AgentError, log
from kiln_device.fleet import DEVICE_HEADER, ENROLL_CONTEXT, KEY_ED25519, SIGNATURE_HEADER, SIGNING_CONTEXT

BATCH_BYTES = 768 * 1024  # of events per upload, under the service's 1 MiB body limit
LATENCY_EVERY = 900.0  # seconds between two inference latency summaries
BACKOFF_START = 30.0
BACKOFF_MAX = 3600.0
TIMEOUT = 30.0


class Rejected(Exception):
    """The service answered 4xx: the request itself is wrong (retrying it unchanged will not help)."""

    def __init__(self, status: int, reason: str, answer: dict[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.answer = answer or {}


def post(config: Config, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(config.fleet.ca)) if config.fleet.ca.is_file() \
        else ssl.create_default_context()
    # fleet.url is https:// (kiln_device.agent.config.finalize_fleet refuses anything else)
    req = urllib.request.Request(config.fleet.url + path, data=body, method="POST",  # noqa: S310
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=ctx) as resp:  # noqa: S310
            answer = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())
            detail = detail if isinstance(detail, dict) else {}
        except (ValueError, OSError, http.client.HTTPException):
            detail = {}
        reason = detail.get("error") or exc.reason
        if 400 <= exc.code < 500:
            raise Rejected(exc.code, str(reason), detail) from None
        raise OSError(f"HTTP {exc.code}: {reason}") from None
    except http.client.HTTPException as exc:  # a link cut mid-answer: IncompleteRead, BadStatusLine
        raise OSError(f"the connection broke: {type(exc).__name__}: {exc}") from None
    if not isinstance(answer, dict):
        raise ValueError(f"the service answered {type(answer).__name__}, not an object")
    return answer


SERIAL_FILES = ("sys/class/dmi/id/product_serial", "sys/firmware/devicetree/base/serial-number")
NO_SERIAL = {"", "0", "none", "default string", "to be filled by o.e.m.", "system serial number", "0123456789"}


def device_serial(config: Config) -> str | None:
    """agent.json fleet.serial, else the firmware's: the DMI product serial (x86) or the device tree's (arm)."""
    if config.fleet.serial:
        return config.fleet.serial
    root = Path(os.environ.get(ROOT_ENV) or "/")
    for name in SERIAL_FILES:
        try:
            serial = (root / name).read_bytes().rstrip(b"\0\n ").decode("ascii", "replace").strip()
        except OSError:
            continue
        if serial.lower() not in NO_SERIAL and serial.isprintable() and len(serial) <= 128:
            return serial
    return None


def enroll(config: Config, release: Release, ident: Identity, outbox: Outbox, meta: dict[str, Any]) -> None:
    if meta.get("enrolled") == config.fleet.url:
        return
    try:
        token = config.fleet.token.read_text().strip()
    except OSError:
        # No token: used and deleted, while meta.json lost the mark (restored from an older copy). The service
        # knows an enrolled device's key: the report itself says whether it is (401 otherwise: no_token()).
        log(f"no enrollment token at {config.fleet.token}: reporting as an enrolled device")
        return
    fields = {"device": ident.id, "publicKey": ident.public_b64, "token": token, "class": release.cls,
              "compatible": release.compatible, "version": release.version, "keyOrigin": ident.store}
    serial = device_serial(config)
    if serial:
        fields["serial"] = serial
    if ident.key_type != KEY_ED25519:
        fields["keyType"] = ident.key_type
    body = json.dumps(fields, sort_keys=True).encode()
    try:
        answer = post(config, "/v1/enroll", body, {SIGNATURE_HEADER: ident.sign(ENROLL_CONTEXT, body)})
    except Rejected as exc:
        if exc.status != 422 or "keyOrigin" not in str(exc):
            raise
        # A service from before enrollment states refuses the fields it does not know: enroll as before.
        for name in ("keyOrigin", "serial"):
            fields.pop(name, None)
        body = json.dumps(fields, sort_keys=True).encode()
        answer = post(config, "/v1/enroll", body, {SIGNATURE_HEADER: ident.sign(ENROLL_CONTEXT, body)})
    state = str(answer.get("state") or "accepted")
    log(f"enrolled with {config.fleet.url} as {ident.id} ({answer.get('status', 'ok')}"
        + ("; waiting for an operator to accept it: kiln fleet accept " + ident.id if state == "pending" else "")
        + ")")
    with outbox.locked():  # re-read: an append may have moved lastSeq or dropped since
        meta = outbox.meta()
        meta["enrolled"] = config.fleet.url
        meta["fleetState"] = state
        outbox.save_meta(meta)
    forget_token(config.fleet.token)


def no_token(config: Config) -> AgentError:
    return AgentError(CONFIG, f"not enrolled with {config.fleet.url} and no enrollment token at {config.fleet.token} "
                              "(a used token is deleted): put a new one there (`kiln fleet token`), or flash one "
                              "with `kiln disk --etc kiln/enroll.token=FILE`")


def forget_token(path: Path) -> None:
    """The token has done its work: a device in the field keeps none (one stolen device must not enroll more)."""
    try:
        path.unlink()
        fsync_dir(path.parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log(f"warning: could not delete the used enrollment token {path}: {exc.strerror}")
    else:
        log(f"deleted the used enrollment token {path}")


def summarize_inference(config: Config, outbox: Outbox, *, every: float = LATENCY_EVERY) -> None:
    """An `inference.latency` event from the inference service's status file (its last 1,000 successful
    requests), at most every EVERY seconds and only when requests were served since the last one."""
    path = under(Path(os.environ.get(ROOT_ENV) or "/"), INFERENCE_STATUS)
    try:
        data = read_json(path)
        latency, served = data.get("latencyMs"), int(data.get("successes") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        return
    with outbox.locked():
        meta = outbox.meta()
        last_at, last_count = float(meta.get("latencyAt") or 0), int(meta.get("latencyCount") or 0)
        if not latency or time.time() - last_at < every or served == last_count:
            return
        meta.update(latencyAt=time.time(), latencyCount=served)
        outbox.save_meta(meta)
    emit(config.outbox_dir, config.fleet.outbox_max, "inference.latency",
         count=served - last_count if served >= last_count else served, total=served,
         errors=int(data.get("errors") or 0), **{k: latency.get(k) for k in ("p50", "p95", "p99", "window")})


def upload(config: Config, release: Release, *, force: bool = False) -> int:
    if not config.fleet.url:
        log("no fleet service configured (agent.json fleet.url): the outbox stays on the device")
        return OK
    outbox = Outbox(config.outbox_dir, config.fleet.outbox_max)
    summarize_inference(config, outbox)
    meta = outbox.meta()
    wait = float(meta.get("nextAttempt") or 0) - time.time()
    if wait > 0 and not force:
        log(f"backing off after {meta.get('failures')} failed uploads: next attempt in {wait:.0f} s "
            f"({meta.get('lastError')})")
        return OK
    try:
        ident = load_or_create(config.identity_dir, config.fleet.identity)
    except AgentError as exc:  # a TPM that stopped answering, a key that does not load: kept, said in status
        return backoff(outbox, f"the device identity: {exc.message}", 0, exc.code)
    config.outbox_dir.mkdir(parents=True, exist_ok=True)
    with open(config.outbox_dir / ".upload.lock", "w") as lock:
        try:  # one upload at a time (the timer's and one by hand); appends never wait on it
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another upload is running; leaving the outbox to it")
            return OK
        return send(config, release, ident, outbox)


def send(config: Config, release: Release, ident: Identity, outbox: Outbox) -> int:
    meta = outbox.meta()
    sent_total = 0
    rebased = recountered = False
    try:
        enroll(config, release, ident, outbox, meta)
        while True:
            events = outbox.pending(config.fleet.batch)
            if not events:
                break
            size, cut = 0, len(events)  # a batch stays under the service's body limit
            for n, e in enumerate(events):
                size += len(json.dumps(e.data)) + 2
                if size > BATCH_BYTES and n > 0:
                    cut = n
                    break
            events = events[:cut]
            try:
                answer = send_batch(config, ident, outbox, events)
            except Rejected as exc:
                if exc.status == 409 and isinstance(exc.answer.get("lastSeq"), int) and not rebased:
                    # The service holds other events under these numbers (this device's meta.json went back):
                    # renumber what waits above its last one, and send again.
                    moved, rebased = outbox.rebase(exc.answer["lastSeq"]), True
                    log(f"the service holds events up to {exc.answer['lastSeq']} under numbers this device used "
                        f"again: {moved} waiting events renumbered above it")
                    continue
                if exc.status == 409 and isinstance(exc.answer.get("counter"), int) and not recountered:
                    # The service has seen a higher counter (this device's meta.json was lost or restored):
                    # go past it, and send again.
                    with outbox.locked():
                        meta = outbox.meta()
                        meta["counter"] = max(int(meta.get("counter") or 0), exc.answer["counter"])
                        outbox.save_meta(meta)
                    recountered = True
                    continue
                if exc.status == 403 and exc.answer.get("state") in ("pending", "rejected"):
                    with outbox.locked():
                        meta = outbox.meta()
                        meta["fleetState"] = exc.answer["state"]
                        outbox.save_meta(meta)
                    raise
                elif exc.status == 401 and "not enrolled" in str(exc):
                    with outbox.locked():  # forgotten by the service: enroll again next time
                        meta = outbox.meta()
                        meta.pop("enrolled", None)
                        outbox.save_meta(meta)
                    if not config.fleet.token.exists():
                        raise no_token(config) from None
                    raise
                else:
                    raise
            acked = int(answer.get("ack") or 0)
            outbox.acknowledge(acked, events)
            sent_total += len(events)
            if acked < events[-1].seq:
                raise OSError(f"the service acknowledged up to {acked} of {events[-1].seq}")
    except Rejected as exc:
        if exc.status == 403 and exc.answer.get("state") == "pending":  # the events wait in the outbox
            return backoff(outbox, f"waiting for an operator to accept this device ({ident.id}): "
                                   f"kiln fleet accept {ident.id}", sent_total, WAITING)
        return backoff(outbox, f"the fleet service refused the report: {exc}", sent_total, CONFIG)
    except AgentError as exc:  # the TPM failed to sign
        return backoff(outbox, exc.message, sent_total, exc.code)
    except (OSError, ValueError, ssl.SSLError) as exc:
        return backoff(outbox, f"{config.fleet.url}: {exc}", sent_total, UNREACHABLE)
    with outbox.locked():
        meta = outbox.meta()
        meta.update(failures=0, nextAttempt=0, lastError=None, lastUpload=time.time())
        outbox.save_meta(meta)
    log(f"reported {sent_total} events to {config.fleet.url}" if sent_total else "nothing to report")
    return OK


def send_batch(config: Config, ident: Identity, outbox: Outbox, events: list[Event]) -> dict[str, Any]:
    with outbox.locked():
        meta = outbox.meta()
        meta["counter"] = int(meta.get("counter") or 0) + 1
        outbox.save_meta(meta)  # saved before sending: a counter is never sent twice
    body = json.dumps({"device": ident.id, "counter": meta["counter"], "dropped": int(meta.get("dropped") or 0),
                       "events": [e.data for e in events]}, sort_keys=True).encode()
    return post(config, "/v1/reports", body,
                {DEVICE_HEADER: ident.id, SIGNATURE_HEADER: ident.sign(SIGNING_CONTEXT, body)})


def backoff(outbox: Outbox, error: str, sent: int, code: int) -> int:
    with outbox.locked():
        meta = outbox.meta()
        failures = int(meta.get("failures") or 0) + 1
        delay = min(BACKOFF_START * 2 ** (failures - 1), BACKOFF_MAX) * random.uniform(0.5, 1.0)  # noqa: S311 (jitter)
        meta.update(failures=failures, nextAttempt=time.time() + delay, lastError=error)
        outbox.save_meta(meta)
    log(f"error: {error} ({sent} events sent this run; {outbox.count()} wait; next attempt in {delay:.0f} s)")
    return code


def cmd_report(config: Config, release: Release, *, force: bool) -> int:
    try:
        return upload(config, release, force=force)
    except AgentError as exc:
        log(f"error: {exc.message}")
        return exc.code
