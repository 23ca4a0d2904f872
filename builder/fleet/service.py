"""`kiln fleet serve`: a Starlette app under uvicorn, over TLS.

    POST /v1/enroll    a device's public key, its enrollment token, signed by the key (proof that it
                       holds the key); the key's origin (tpm, file) and the device's serial
    POST /v1/reports   a batch of outbox events, signed by the device key (kiln_device.fleet)
    GET  /healthz      the service and its database answer

and, on the operators' listener only (`--operator-listen`, loopback by default; anywhere else it
wants a bearer token, `--operator-token-file`):

    GET  /v1/status    the fleet's state as JSON (?class=CLASS)
    GET  /             the same as an HTML page

Devices see only their own endpoints: the fleet's state (device ids, versions, reasons) is not
theirs to read, and the database's location is shown to no one over HTTP.

A new identity is pending until the allow-list (`kiln fleet allow`: its serial, or every device
of its class) or an operator (`kiln fleet accept`) accepts it: a token alone, which every device
of a batch carries, makes no device whose reports count. A pending or rejected device's reports
get a 403 and are not stored, so they never count toward a halt or a promotion.

A report that is malformed, too big, unsigned, signed by another key, from a device that is
not enrolled or not accepted, or replayed gets a 4xx and a JSON {"error": reason}; nothing of it
is stored.
After a report with failures, the rollouts of that class are checked: when the failure rate
of a rollout's open waves is over its maxFailureRate (once haltMinDevices have tried), the
service signs the halt into the channel's rollout metadata (with the rollout and online keys
it was given), so later waves never start, even while the service itself is down. Every TICK
seconds it opens the next wave of the rollouts whose class asks for it (rollout.autoPromote)
once the current wave has soaked within the failure rate.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from builder.core.errors import UsageError
from builder.fleet import views
from builder.fleet.store import ACCEPTED, KEY_ORIGINS, PENDING, Refused, Store, event_time
from kiln_device.fleet import (
    DEVICE_HEADER,
    ENROLL_CONTEXT,
    EVENT_KINDS,
    KEY_ECDSA_P256,
    KEY_ED25519,
    KEY_TYPES,
    MAX_BODY,
    MAX_EVENT_BYTES,
    MAX_EVENTS,
    SIGNATURE_HEADER,
    SIGNING_CONTEXT,
    device_id,
    is_device_id,
)

log = logging.getLogger("kiln.fleet")
KIND_RE = re.compile(r"[a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*){0,3}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


BODY_TIMEOUT_ENV = "KILN_FLEET_BODY_TIMEOUT"  # seconds a client has to send its whole body (default 30)


async def read_body(request: Request) -> bytes:
    """The request's body, at most MAX_BODY bytes, within the body timeout: a client that trickles or stalls
    (slow-loris) gets a 408 and its worker back, instead of holding it."""
    import asyncio
    import os

    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise Refused(413, f"the body is over {MAX_BODY} bytes")
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_BODY:
                raise Refused(413, f"the body is over {MAX_BODY} bytes")

    limit = float(os.environ.get(BODY_TIMEOUT_ENV) or 30)
    try:
        await asyncio.wait_for(read(), limit)
    except TimeoutError:
        raise Refused(408, f"the body did not arrive within {limit:g} s") from None
    return bytes(body)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(400, f"the body is not JSON: {exc}") from None
    except RecursionError:  # [[[[...]]]]: a 400, not a worker's stack overflowing into a 500
        raise Refused(400, "the body is not JSON a report can be: nested too deeply") from None
    if not isinstance(data, dict):
        raise Refused(400, "the body must be a JSON object")
    return data


def public_key(key_type: str, raw: bytes) -> Any:
    """The device's public key from its bytes (kiln_device.fleet): raw ed25519, or the DER
    SubjectPublicKeyInfo of a P-256 key; Refused (422) when the bytes are not a key of that type."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        if key_type == KEY_ED25519:
            if len(raw) != 32:
                raise ValueError("an ed25519 public key is 32 bytes")
            return Ed25519PublicKey.from_public_bytes(raw)
        if key_type == KEY_ECDSA_P256:
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            key = load_der_public_key(raw)
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
                raise ValueError("not a P-256 public key")
            if key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != raw:
                # one key, one id: a compressed point (or any other encoding) would name a second device
                raise ValueError("not the DER SubjectPublicKeyInfo with an uncompressed point")
            return key
    except (ValueError, TypeError) as exc:
        raise Refused(422, f"publicKey: not an {key_type} public key ({exc})") from None
    raise Refused(422, f"keyType: expected one of {', '.join(KEY_TYPES)}")


def verify(public_b64: str, context: bytes, body: bytes, signature: str | None, key_type: str = KEY_ED25519) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if not signature:
        raise Refused(401, f"unsigned: the {SIGNATURE_HEADER} header is missing")
    try:
        key = public_key(key_type, base64.b64decode(public_b64, validate=True))
        raw = base64.b64decode(signature, validate=True)
        if key_type == KEY_ECDSA_P256:
            key.verify(raw, context + body, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(raw, context + body)
    except (InvalidSignature, ValueError, binascii.Error):
        raise Refused(401, "the signature does not verify with this device's key") from None


def is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**62


def check_report(data: dict[str, Any]) -> tuple[str, int, int, list[dict[str, Any]]]:
    unknown = sorted(set(data) - {"device", "counter", "dropped", "events"})
    if unknown:
        raise Refused(422, f"unknown fields {', '.join(unknown)}")
    device, counter, dropped, events = data.get("device"), data.get("counter"), data.get("dropped", 0), \
        data.get("events")
    if not is_device_id(device):
        raise Refused(422, "device: expected a device id (kd- and 24 hex digits)")
    if not is_int(counter, 1):
        raise Refused(422, "counter: expected a whole number above 0")
    if not is_int(dropped):
        raise Refused(422, "dropped: expected a whole number, 0 or more")
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_EVENTS:
        raise Refused(422, f"events: expected a list of 1 to {MAX_EVENTS} events")
    last = 0
    for n, e in enumerate(events):
        where = f"events[{n}]"
        if not isinstance(e, dict):
            raise Refused(422, f"{where}: expected an object")
        if not is_int(e.get("seq"), 1) or e["seq"] <= last:
            raise Refused(422, f"{where}.seq: expected a whole number above the previous event's ({last})")
        last = e["seq"]
        if not isinstance(e.get("kind"), str) or not KIND_RE.fullmatch(e["kind"]):
            # Kinds this service does not know (a newer agent's) are kept; a kind is a dotted name.
            raise Refused(422, f"{where}.kind: {str(e.get('kind'))[:40]!r} is not an event kind (a dotted lowercase "
                               f"name, for example {', '.join(list(EVENT_KINDS)[:3])})")
        if not isinstance(e.get("time"), str) or event_time(e["time"]) is None:
            raise Refused(422, f"{where}.time: expected a UTC time, YYYY-MM-DDTHH:MM:SSZ")
        if e.get("version") is not None and not (isinstance(e["version"], str) and len(e["version"]) <= 64):
            raise Refused(422, f"{where}.version: expected a version string")
        if len(json.dumps(e)) > MAX_EVENT_BYTES:
            raise Refused(422, f"{where}: over {MAX_EVENT_BYTES} bytes")
    return str(device), int(counter), int(dropped), events  # type: ignore[arg-type]


class Halter:
    """The automatic halt and promotion: reads rollout state from the TUF repository, signs changes into it."""

    def __init__(self, store: Store, repo: Any) -> None:
        self.store = store
        self.repo = repo
        self.lock = threading.Lock()

    def promote(self) -> list[str]:
        """Open the next wave of every rollout that asks for it (autoPromote), is not halted, has soaked, and
        whose open waves stayed at or under the failure rate with enough devices succeeded (haltMinDevices, or
        every device of the open waves when there are fewer, and at least one). The rollouts promoted."""
        from builder.release import rollout

        done = []
        with self.lock:
            for cls, channel, state in views.all_rollouts(self.repo):
                if not state.get("autoPromote") or state.get("halted") or \
                        int(state["wave"]) >= len(state["stages"]) or rollout.soak_left(state) > 0:
                    continue
                table = views.wave_table(self.store, cls, self.store.devices(cls), state)
                if table["succeeded"] < table["successesNeeded"] or \
                        table["failureRate"] > float(state.get("maxFailureRate", 1.0)):
                    continue  # no evidence yet (`kiln fleet status` says so), or over the failure rate
                try:  # checked again under the repository's lock: halted or replaced since, it is refused
                    rollout.advance(self.repo, cls, channel, version=str(state["version"]))
                except UsageError as exc:
                    log.info("not promoting %s on %s: %s", cls, channel, exc)
                    continue
                log.warning("promoted the rollout of %s %s on %s to wave %d", cls, state["version"], channel,
                            int(state["wave"]) + 1)
                done.append(f"{cls}/{channel}")
        return done

    def run(self, every: float, stop: threading.Event) -> None:
        while not stop.wait(every):
            try:
                self.promote()
            except Exception:  # a promotion that cannot be signed is logged; the service keeps serving
                log.exception("promoting rollouts")

    def check(self, cls: str, versions: tuple[str, ...]) -> list[str]:
        if self.repo is None:
            return []
        from builder.release import rollout

        halted = []
        with self.lock:
            for channel, state in views.rollouts(self.repo, cls).items():
                if state.get("halted") or state.get("version") not in versions:
                    continue
                members = self.store.devices(cls)
                table = views.wave_table(self.store, cls, members, state)
                if table["tried"] >= int(state.get("haltMinDevices") or 1) and \
                        table["failureRate"] > float(state.get("maxFailureRate", 1.0)):
                    top = table["topReasons"][0]["reason"] if table["topReasons"] else "unknown"
                    reason = (f"{table['failed']} of {table['tried']} devices in wave {state['wave']} failed or rolled "
                              f"back ({table['failureRate']:.0%} > {float(state['maxFailureRate']):.0%}); "
                              f"top reason: {top}")
                    rollout.halt(self.repo, cls, channel, reason, by="kiln fleet serve", version=str(state["version"]))
                    self.store.record_halt(cls, channel, str(state["version"]), reason)
                    log.warning("halted the rollout of %s %s on %s: %s", cls, state["version"], channel, reason)
                    halted.append(channel)
        return halted


OPERATOR_PATHS = ("/v1/status", "/")
DEVICE_PATHS = ("/v1/enroll", "/v1/reports")


def listeners(app: Any, operator_port: int | None, token_hash_hex: str | None) -> Any:
    """APP served on two sockets: requests to OPERATOR_PORT reach only the operators' endpoints (with the bearer
    token whose sha256 is TOKEN_HASH_HEX, when one is set), the others only the devices'; /healthz on both."""

    async def routed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        port = (scope.get("server") or (None, None))[1]
        path = scope.get("path", "")
        operator = operator_port is not None and port == operator_port
        allowed = ("/healthz", *(OPERATOR_PATHS if operator else DEVICE_PATHS))
        if path not in allowed:
            await JSONResponse({"error": "not found"}, status_code=404)(scope, receive, send)
            return
        if operator and token_hash_hex and path != "/healthz":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            import hmac

            if not given.startswith("Bearer ") or not hmac.compare_digest(
                    token_hash(given.removeprefix("Bearer ").strip()), token_hash_hex):
                await JSONResponse({"error": "an operator's bearer token is required"}, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await app(scope, receive, send)

    return routed


def make_app(store: Store, repo: Any = None, *, tick: float = 60.0) -> Starlette:
    halter = Halter(store, repo)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = threading.Event()
        ticker = threading.Thread(target=halter.run, args=(tick, stop), name="promote", daemon=True)
        if repo is not None:
            ticker.start()
        try:
            yield
        finally:
            stop.set()

    def error(exc: Refused) -> JSONResponse:
        return JSONResponse({"error": exc.reason, **exc.detail}, status_code=exc.status)

    async def enroll(request: Request) -> Response:
        try:
            body = await read_body(request)
            data = parse_json(body)
            fields = ("device", "publicKey", "token", "class", "compatible", "version")
            optional = ("keyType", "keyOrigin", "serial")
            data.setdefault("keyType", KEY_ED25519)  # an agent from before TPM keys
            data.setdefault("keyOrigin", "unknown")  # an agent from before enrollment states
            present = [*fields, *(f for f in optional if f in data and data[f] is not None)]
            bad = [f for f in present if not isinstance(data.get(f), str) or not data[f] or len(data[f]) > 256]
            if bad or set(data) - {*fields, *optional}:
                raise Refused(422, f"expected the string fields {', '.join(fields)}, and {', '.join(optional)}"
                                   + (f" (bad: {', '.join(bad)})" if bad else ""))
            if data["keyOrigin"] not in KEY_ORIGINS:
                raise Refused(422, f"keyOrigin: expected one of {', '.join(KEY_ORIGINS)}")
            try:
                raw = base64.b64decode(data["publicKey"], validate=True)
            except binascii.Error:
                raise Refused(422, "publicKey: not base64") from None
            public_key(data["keyType"], raw)
            if device_id(raw) != data["device"]:
                raise Refused(422, "device: not the id of this public key")
            verify(data["publicKey"], ENROLL_CONTEXT, body, request.headers.get(SIGNATURE_HEADER), data["keyType"])
            status, state = await run_in_threadpool(
                lambda: store.enroll(data["device"], data["class"], data["compatible"], data["publicKey"],
                                     token_hash(data["token"]), data["version"], data["keyType"],
                                     key_origin=data["keyOrigin"], serial=data.get("serial")))
        except Refused as exc:
            return error(exc)
        return JSONResponse({"status": status, "state": state, "device": data["device"]})

    async def reports(request: Request) -> Response:
        try:
            body = await read_body(request)
            device, counter, dropped, events = check_report(parse_json(body))
            if request.headers.get(DEVICE_HEADER) not in (None, device):
                raise Refused(401, f"the {DEVICE_HEADER} header names another device than the body")
            known = await run_in_threadpool(store.device_key, device)
            if known is None:
                raise Refused(401, f"device {device} is not enrolled")
            public, cls, key_type, state = known
            verify(public, SIGNING_CONTEXT, body, request.headers.get(SIGNATURE_HEADER), key_type)
            if state != ACCEPTED:
                waiting = " is waiting for an operator to accept it" if state == PENDING else " was rejected"
                raise Refused(403, f"device {device}{waiting}: its reports are not taken", state=state)
            result = await run_in_threadpool(store.ingest, device, counter, dropped, events)
        except Refused as exc:
            return error(exc)
        if result.failures and repo is not None:
            try:
                await run_in_threadpool(halter.check, cls, result.failures)
            except Exception:  # the report is stored: a halt that cannot be signed is logged, never a 500
                log.exception("checking the rollouts of %s after failures of %s", cls, ", ".join(result.failures))
        return JSONResponse({"accepted": result.accepted, "duplicates": result.duplicates, "ack": result.ack})

    def shown(cls: str | None) -> dict[str, Any]:
        data = views.fleet_status(store, repo, cls)
        data.pop("database", None)  # where the database lives is for the host's own `kiln fleet status`
        return data

    async def status(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(shown, request.query_params.get("class")))

    async def page(request: Request) -> Response:
        return HTMLResponse(views.render_html(await run_in_threadpool(shown, request.query_params.get("class"))))

    async def healthz(request: Request) -> Response:
        count = await run_in_threadpool(store.version)
        return JSONResponse({"ok": True, "schema": count, "database": store.backend})

    return Starlette(lifespan=lifespan, routes=[
        Route("/v1/enroll", enroll, methods=["POST"]),
        Route("/v1/reports", reports, methods=["POST"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> Any:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(store: Store, repo: Any, *, host: str, port: int, tls_dir: Path, log_level: str = "info",
          tick: float = 60.0, operator: tuple[str, int] | None = None, operator_token: str | None = None,
          max_connections: int = 1000) -> None:
    """Serve devices on HOST:PORT and operators on OPERATOR (HOST, PORT), both over TLS, in one process. An
    operators' listener off the loopback needs OPERATOR_TOKEN (the bearer token's text)."""
    import uvicorn

    from builder.fleet import pki

    if operator is not None and not is_loopback(operator[0]) and not operator_token:
        raise UsageError(f"--operator-listen {operator[0]}:{operator[1]} is not a loopback address: give "
                         "--operator-token-file FILE (operators send it as a bearer token), or keep it on "
                         "127.0.0.1 and reach it through an SSH tunnel")
    cert, key = pki.require(tls_dir)
    sockets = [bind(host, port)]
    operator_port = None
    if operator is not None:
        sockets.append(bind(*operator))
        operator_port = sockets[-1].getsockname()[1]
    app = listeners(make_app(store, repo, tick=tick), operator_port,
                    token_hash(operator_token) if operator_token else None)
    # A bound on what clients hold: MAX_CONNECTIONS at once, a 503 beyond (uvicorn's limit counts the connection
    # it refuses: one more); idle keep-alive 5 s; the body, read_body's timeout; headers, h11's 16 KiB.
    config = uvicorn.Config(app, ssl_certfile=str(cert), ssl_keyfile=str(key), log_level=log_level, access_log=False,
                            server_header=False, timeout_graceful_shutdown=5, limit_concurrency=max_connections + 1,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024)
    uvicorn.Server(config).run(sockets=sockets)
