"""The fuzz tier (issue 33): the real fleet service (`kiln fleet serve`, uvicorn over TLS, SQLite) and the agent's
own parsers, attacked with generated data (hypothesis): malformed and deeply nested JSON, bodies near and over the
limit, replays, wrong keys and other devices' ids, escapes and NULs in every text field.

What must hold: no 5xx, ever; a refused request stores nothing (the rows stored are exactly the events the
accepted requests carried); the service still answers after it. `KILN_FUZZ_EXAMPLES` sets the cases per
property (200 here, in CI; scripts/test-fuzz runs 2,000), and the figures (cases tried, refused, accepted, 5xx,
the p99 of the answers) are printed at the end, and written to $KILN_FUZZ_JSON when set."""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.fleet.store import open_store
from kiln_device.fleet import DEVICE_HEADER, ENROLL_CONTEXT, SIGNATURE_HEADER, SIGNING_CONTEXT
from tests.conftest import kiln
from tests.fleet import FleetService, SimDevice, running_fleet

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES") or 200)
FIGURES: Counter[str] = Counter()
LATENCIES: list[float] = []
NASTY = ["\x1b[2J\x1b[31m", "\x00", "\u202e", "'; DROP TABLE events; --", "<script>alert(1)</script>", "%s%n",
         "\ud7ff\ue000", "../../etc/passwd", "\r\nSet-Cookie: x", "é" * 300]
text = st.one_of(st.text(max_size=60), st.sampled_from(NASTY), st.text(alphabet="\x00\x1b\x7f\n\r\t", max_size=8))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(text, inner, max_size=4)), max_leaves=20)
kinds = st.one_of(st.sampled_from(["boot", "update.failed", "rollback", "update.success", "channel.stale"]), text)
times = st.one_of(st.just("2026-12-06T12:00:00Z"), st.text(min_size=20, max_size=20), text,
                  st.sampled_from(["2026-02-30T00:00:00Z", "9999-12-31T23:59:59Z", "1970-01-01T00:00:00Z"]))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetService, str, SimDevice, SimDevice]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    db = f"sqlite:///{tmp / 'fleet.db'}"
    with running_fleet(tmp, db) as svc:
        kiln("fleet", "allow", "tiny", "--any-device", "--db", db, check=True)
        kiln("fleet", "token", "tiny", "--uses", "3", "--out", str(tmp / "tok"), "--db", db, check=True)
        me, other = (SimDevice.create(tmp / name, svc, tmp / "tok") for name in ("me", "other"))
        for dev in (me, other):
            dev.emit("boot", version="1.0.0")
            assert dev.report() == 0
        yield svc, db, me, other
    summary = {**FIGURES, "p99Ms": round(sorted(LATENCIES)[int(len(LATENCIES) * 0.99)] * 1000, 1) if LATENCIES
               else None}
    print(f"\nfuzz figures: {json.dumps(summary, sort_keys=True)}")
    if os.environ.get("KILN_FUZZ_JSON"):
        Path(os.environ["KILN_FUZZ_JSON"]).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def post(svc: FleetService, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=str(svc.ca))
    req = urllib.request.Request(svc.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    LATENCIES.append(time.perf_counter() - start)
    FIGURES["cases"] += 1
    FIGURES["5xx" if status >= 500 else "refused" if status >= 400 else "accepted"] += 1
    assert status < 500, (status, raw[:300], body[:300])
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def stored_events(db: str) -> int:
    store = open_store(db)
    try:
        return store.count_events()
    finally:
        store.close()


def counter() -> int:
    return time.time_ns()  # above every counter a device has sent: a fresh request each time


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(body=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                      st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
                      st.integers(0, 5).map(lambda n: b'{"device": "' + b"\xff" * n + b'"}')),
       signed=st.booleans(), path=st.sampled_from(["/v1/reports", "/v1/enroll"]))
def test_any_body_gets_an_answer_under_500_and_stores_nothing(fleet, body: bytes, signed: bool, path: str) -> None:
    svc, db, me, _ = fleet
    before = stored_events(db)
    ident = me.identity
    context = SIGNING_CONTEXT if path == "/v1/reports" else ENROLL_CONTEXT
    headers = {SIGNATURE_HEADER: ident.sign(context, body)} if signed else {}
    status, _ = post(svc, path, body, headers)
    assert status >= 400
    assert stored_events(db) == before


event = st.fixed_dictionaries({"seq": st.one_of(st.integers(-5, 2**63), scalars), "kind": kinds, "time": times},
                              optional={"version": st.one_of(text, scalars), "reason": st.one_of(text, json_values),
                                        "extra": json_values, "code": scalars})


# Well-formed events with escapes, NULs and markup in their text: accepted, stored inert (a fresh seq each time).
good_events = st.lists(st.fixed_dictionaries(
    {"kind": st.sampled_from(["boot", "update.failed", "rollback", "update.success", "rollout.waiting"]),
     "time": st.just("2026-12-06T12:00:00Z")},
    optional={"version": st.text(max_size=64), "reason": text, "slot": text, "degraded": text}),
    min_size=1, max_size=5).map(lambda es: [{**e, "seq": time.time_ns() + n} for n, e in enumerate(es)])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(events=st.one_of(good_events, st.lists(event, max_size=6), json_values),
       dropped=st.one_of(st.integers(0, 10), scalars),
       who=st.sampled_from(["me", "other", "unknown", "garbage"]), key=st.sampled_from(["mine", "other's", "none"]),
       replay=st.booleans())
def test_reports_with_fields_gone_wrong_are_refused_or_stored_exactly(fleet, events: Any, dropped: Any, who: str,
                                                                      key: str, replay: bool) -> None:
    svc, db, me, other = fleet
    device = {"me": me.identity.id, "other": other.identity.id, "unknown": "kd-" + "0" * 24,
              "garbage": "\x1b[31mkd-"}[who]
    body = json.dumps({"device": device, "counter": 1 if replay else counter(), "dropped": dropped,
                       "events": events}).encode()
    signer = {"mine": me.identity, "other's": other.identity, "none": None}[key]
    headers = {DEVICE_HEADER: device} if who != "garbage" else {}
    if signer is not None:
        headers[SIGNATURE_HEADER] = signer.sign(SIGNING_CONTEXT, body)
    before = stored_events(db)
    status, answer = post(svc, "/v1/reports", body, headers)
    after = stored_events(db)
    if status >= 400:
        assert after == before, (status, answer)
        return
    # Accepted only when everything about it was right, and then exactly its new events are stored.
    assert who == "me" and key == "mine" and not replay, (who, key, replay, answer)
    assert after - before == answer["accepted"] and answer["accepted"] + answer["duplicates"] == len(events)


def test_the_service_still_answers_after_the_attack(fleet) -> None:
    svc, db, me, _ = fleet
    before = stored_events(db)
    me.emit("boot", version="1.0.0", after="fuzz")
    assert me.report() == 0 and stored_events(db) == before + 1
    assert svc.get("/healthz")["ok"] and FIGURES["5xx"] == 0 and FIGURES["cases"] >= EXAMPLES
