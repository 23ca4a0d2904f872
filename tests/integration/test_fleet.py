"""The fleet (issue 14): the real `kiln fleet serve` (uvicorn, TLS) on SQLite and on a real PostgreSQL
server, devices running the agent's own identity, outbox and upload code, and the real agent on fake
devices (tests/ota.py) taking staged rollouts from signed TUF metadata: waves, the automatic halt, the
maintenance window. The fleet page is read in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.fleet.store import open_store
from builder.release import rollout
from kiln_device.fleet import ENROLL_CONTEXT, SIGNATURE_HEADER, SIGNING_CONTEXT, place, wave_of
from tests.conftest import require_tool
from tests.fleet import (
    FleetService,
    SimDevice,
    declare_only,
    kiln,
    running_fleet,
    running_postgres,
    running_swtpm,
)
from tests.integration.test_trusted_channel import EXIT, World, sha, slots
from tests.integration.test_trusted_channel import world as world

pytestmark = pytest.mark.integration
EXIT = {**EXIT, "waiting": 14}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'fleet.db'}"
    else:
        with running_postgres() as url:
            yield url


@pytest.fixture(scope="module")
def service(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetService]:
    with running_fleet(tmp_path_factory.mktemp("fleet"), backend) as svc:
        kiln("fleet", "allow", "tiny", "--any-device", "--db", backend, check=True)  # a test fleet: tokens enroll
        yield svc


def token(db: str, path: Path, cls: str = "tiny", uses: int = 1) -> Path:
    kiln("fleet", "token", cls, "--uses", str(uses), "--out", str(path), "--db", db, check=True)
    assert path.stat().st_mode & 0o077 == 0
    return path


def stored(db: str, device: str) -> list[dict]:  # type: ignore[type-arg]
    store = open_store(db)
    try:
        return store.events(device)
    finally:
        store.close()


def total(db: str) -> int:
    store = open_store(db)
    try:
        return store.count_events()
    finally:
        store.close()


def test_the_database_and_tokens_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """Finding (issue 33, 12): fleet.db, its -wal and -shm files, and a token written over an existing file were
    0644 under the usual umask: any user on the service's host could read device ids and token hashes."""
    db = tmp_path / "fleet.db"
    old = os.umask(0o022)
    try:
        store = open_store(f"sqlite:///{db}")
        try:
            store.migrate()
            store.add_token("0" * 64, "tiny", 1, time.time() + 60)
            files = [db, *tmp_path.glob("fleet.db-*")]
            assert {f.name for f in files} >= {"fleet.db", "fleet.db-wal", "fleet.db-shm"}
            assert all(f.stat().st_mode & 0o077 == 0 for f in files), {f.name: oct(f.stat().st_mode) for f in files}
        finally:
            store.close()
        out = tmp_path / "enroll.token"
        out.write_text("an older token\n")
        out.chmod(0o644)
        token(f"sqlite:///{db}", out)  # asserts the mode
    finally:
        os.umask(old)


def test_tokens_and_database_passwords_stay_off_stdout_and_the_command_line(tmp_path: Path) -> None:
    """Finding (issue 33, 13): `kiln fleet token` printed the token on stdout unless told otherwise (where CI logs
    keep it), and `--db postgresql://user:password@...` put a password on the command line. The token goes to
    --out FILE unless --stdout asks; a password in --db is refused, naming where it goes instead."""
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    r = kiln("fleet", "token", "tiny", "--db", db)
    assert r.returncode == 2 and "give --out FILE" in r.stderr and r.stdout == "", r.stderr
    shown = kiln("fleet", "token", "tiny", "--stdout", "--db", db, check=True)
    assert len(shown.stdout.strip()) >= 40
    r = kiln("fleet", "status", "--db", "postgresql://kiln:hunter2-secret@127.0.0.1:1/fleet")
    assert r.returncode == 2 and "carries a password" in r.stderr and "KILN_FLEET_DB" in r.stderr, r.stderr
    assert "hunter2-secret" not in r.stdout + r.stderr


def test_reports_arrive_exactly_once_in_order(service: FleetService, backend: str, tmp_path: Path) -> None:
    dev = SimDevice.create(tmp_path / "d", service, token(backend, tmp_path / "tok"), batch=100)
    for n in range(250):
        dev.emit("update.phase", version="1.1.0", phase=f"p{n}")
    saved = tmp_path / "outbox-copy"
    shutil.copytree(dev.config.outbox_dir, saved)
    assert dev.report() == 0
    events = stored(backend, dev.identity.id)
    assert [e["seq"] for e in events] == list(range(1, 251))
    assert [e["phase"] for e in events] == [f"p{n}" for n in range(250)]
    assert dev.outbox.count() == 0
    # The answers were lost (the device kept its events, its counter went on): sent again, stored once.
    for f in saved.glob("0*.json"):
        shutil.copy2(f, dev.config.outbox_dir / f.name)
    assert dev.outbox.count() == 250
    assert dev.report() == 0
    assert len(stored(backend, dev.identity.id)) == 250 and dev.outbox.count() == 0
    dev.emit("rollback", version="1.1.0", reason="inference-golden failed")
    assert dev.report() == 0
    assert [e["seq"] for e in stored(backend, dev.identity.id)][-2:] == [250, 251]


def test_the_outbox_is_bounded_and_says_what_it_dropped(service: FleetService, backend: str, tmp_path: Path) -> None:
    dev = SimDevice.create(tmp_path / "d", service, token(backend, tmp_path / "tok"), outbox_max=10)
    for n in range(25):
        dev.emit("health", ok=True, n=n)
    assert dev.outbox.count() == 10 and dev.outbox.meta()["dropped"] == 15
    assert dev.report() == 0
    events = stored(backend, dev.identity.id)
    assert [e["n"] for e in events] == list(range(15, 25))  # the newest ten, in order
    status = service.get("/v1/status?class=tiny")
    assert status["classes"]["tiny"]["dropped"] >= 15


def test_fleet_status_shows_device_text_inert(service: FleetService, backend: str, tmp_path: Path) -> None:
    """Finding (issue 33, 8): `kiln fleet status` printed what devices reported as it came, escape sequences
    included: a device could retitle or clear the operator's terminal, or hide lines. They show as \\xNN."""
    dev = SimDevice.create(tmp_path / "d", service, token(backend, tmp_path / "tok"))
    dev.emit("boot", version="1.0.0", slot="a", degraded="no GPU\x1b]0;owned\x07\x1b[2J")
    assert dev.report() == 0
    out = kiln("fleet", "status", "tiny", "--db", backend, check=True).stdout
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert "no GPU\\x1b]0;owned\\x07\\x1b[2J" in out, out


def signed(dev: SimDevice, body: dict, context: bytes = SIGNING_CONTEXT) -> tuple[bytes, dict[str, str]]:  # type: ignore[type-arg]
    raw = json.dumps(body).encode()
    return raw, {SIGNATURE_HEADER: dev.identity.sign(context, raw)}


def test_bad_reports_get_a_4xx_with_a_reason_and_nothing_is_stored(service: FleetService, backend: str,
                                                                   tmp_path: Path) -> None:
    dev = SimDevice.create(tmp_path / "d", service, token(backend, tmp_path / "tok"))
    dev.emit("boot", version="1.0.0", slot="a")
    assert dev.report() == 0
    other = SimDevice.create(tmp_path / "o", service, token(backend, tmp_path / "tok2"))
    other.emit("boot", version="1.0.0", slot="a")
    assert other.report() == 0
    never = SimDevice.create(tmp_path / "n", service, tmp_path / "none")
    me = dev.identity.id
    counter = int(dev.outbox.meta()["counter"])
    good = {"device": me, "counter": counter + 1, "dropped": 0,
            "events": [{"seq": 99, "time": "2026-11-30T12:00:00Z", "kind": "boot", "version": "1.0.0"}]}
    before = total(backend)
    cases: list[tuple[bytes, dict[str, str], int, str]] = [
        (b"{not json", {SIGNATURE_HEADER: "x"}, 400, "not JSON"),
        (b"[]", {SIGNATURE_HEADER: "x"}, 400, "JSON object"),
        (json.dumps(good).encode(), {}, 401, "unsigned"),
        (*signed(other, good), 401, "does not verify"),  # another device's key cannot report as this one
        (*signed(dev, {**good, "device": other.identity.id}), 401, "does not verify"),
        (*signed(never, {**good, "device": never.identity.id}), 401, "not enrolled"),
        (*signed(dev, {**good, "counter": counter}), 409, "replayed"),
        (*signed(dev, {**good, "events": [{**good["events"][0], "kind": "rm -rf"}]}), 422, "kind"),
        (*signed(dev, {**good, "events": [{**good["events"][0], "seq": 0}]}), 422, "seq"),
        (*signed(dev, {**good, "events": [{**good["events"][0], "blob": "x" * 20000}]}), 422, "bytes"),
        (*signed(dev, {**good, "events": []}), 422, "events"),
        (*signed(dev, {**good, "admin": True}), 422, "unknown fields"),
    ]
    for body, headers, status, says in cases:
        code, answer = service.post("/v1/reports", body, headers)
        assert (code, says in answer.get("error", "")) == (status, True), (status, says, code, answer)
    # A kind this service does not know (a newer agent's) and a NUL in a reason are stored, not refused.
    odd = {**good, "counter": counter + 1, "events": [{**good["events"][0], "seq": 50, "kind": "camera.lost",
                                                         "reason": "usb\u0000reset"}]}
    code, answer = service.post("/v1/reports", *signed(dev, odd))
    assert code == 200 and answer["accepted"] == 1, answer
    before += 1
    good["counter"] = counter + 2
    code, answer = declare_only(service, "/v1/reports", 1024 * 1024 + 10)
    assert code == 413 and "over" in answer["error"], answer
    replay_body, replay_headers = signed(dev, good)
    assert service.post("/v1/reports", replay_body, replay_headers)[0] == 200
    assert total(backend) == before + 1
    code, answer = service.post("/v1/reports", replay_body, replay_headers)  # the same request again
    assert code == 409 and "replayed" in answer["error"]
    assert total(backend) == before + 1
    assert service.get("/healthz")["ok"] is True


def test_a_device_that_lost_its_counter_or_was_forgotten_recovers(service: FleetService, backend: str,
                                                                  tmp_path: Path) -> None:
    tok = token(backend, tmp_path / "tok", uses=2)
    dev = SimDevice.create(tmp_path / "d", service, tok)
    for n in range(3):
        dev.emit("boot", version="1.0.0", n=n)
    assert dev.report() == 0
    meta = dev.outbox.meta()
    meta["counter"] = 0  # meta.json restored from an old backup
    dev.outbox.save_meta(meta)
    dev.emit("boot", version="1.0.0", n=3)
    assert dev.report() == 0  # the 409 says the service's counter; the device goes past it
    assert [e["n"] for e in stored(backend, dev.identity.id)] == [0, 1, 2, 3]
    store = open_store(backend)
    try:
        with store.tx() as cur:  # the operator removed the device from the database
            cur.execute(store.sql("DELETE FROM events WHERE device = ?"), (dev.identity.id,))
            cur.execute(store.sql("DELETE FROM devices WHERE id = ?"), (dev.identity.id,))
    finally:
        store.close()
    dev.emit("boot", version="1.0.0", n=4)
    assert dev.report() == 11 and "not enrolled" in dev.outbox.meta()["lastError"]
    # Its token was deleted once used: it cannot enroll again by itself, and says how to give it a new one.
    assert dev.report() == 11 and "no enrollment token" in dev.outbox.meta()["lastError"]
    shutil.copyfile(tok, dev.config.fleet.token)  # the operator gives it one (here: the token's second use)
    assert dev.report() == 0  # enrolled again, the kept event sent
    assert [e["n"] for e in stored(backend, dev.identity.id)] == [4]


def test_enrollment_needs_a_token_for_the_class(service: FleetService, backend: str, tmp_path: Path) -> None:
    tok = token(backend, tmp_path / "tok", uses=1)
    first = SimDevice.create(tmp_path / "a", service, tok)
    first.emit("boot", version="1.0.0")
    assert first.report() == 0
    assert first.report() == 0  # enrolled once: no second use of the token
    second = SimDevice.create(tmp_path / "b", service, tok)
    second.emit("boot", version="1.0.0")
    assert second.report() == 11  # refused, kept, backing off
    assert "used up" in second.outbox.meta()["lastError"] and second.outbox.count() == 1
    wrong = SimDevice.create(tmp_path / "c", service, token(backend, tmp_path / "tok-o", cls="qemu-x86_64"))
    wrong.emit("boot", version="1.0.0")
    assert wrong.report() == 11 and "for class qemu-x86_64" in wrong.outbox.meta()["lastError"]
    (tmp_path / "bogus").write_text("not-a-token\n")
    bogus = SimDevice.create(tmp_path / "d", service, tmp_path / "bogus")
    bogus.emit("boot", version="1.0.0")
    assert bogus.report() == 11 and "unknown enrollment token" in bogus.outbox.meta()["lastError"]
    # Proof of possession: an enrollment for a key the sender does not hold is refused.
    body = json.dumps({"device": first.identity.id, "publicKey": first.identity.public_b64, "token": "x",
                       "class": "tiny", "compatible": "kiln,tiny", "version": "1.0.0"}).encode()
    code, answer = service.post("/v1/enroll", body, {SIGNATURE_HEADER: second.identity.sign(ENROLL_CONTEXT, body)})
    assert code == 401, answer
    raw_key = base64.b64encode(b"\0" * 32).decode()
    body = json.dumps({"device": first.identity.id, "publicKey": raw_key, "token": "x", "class": "tiny",
                       "compatible": "kiln,tiny", "version": "1.0.0"}).encode()
    assert service.post("/v1/enroll", body, {SIGNATURE_HEADER: "AA=="})[0] == 422  # not the id of that key


def test_a_tpm_key_enrolls_signs_and_stays_the_device_identity(service: FleetService, backend: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The device key made by a TPM (swtpm): ECDSA P-256, never in a file; its reports verify, a software key
    claiming its id does not; the identity survives a restart of the TPM and is never silently replaced."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from kiln_device.agent.identity import KEY_FILE, TPM_FILE, TPM_HANDLE, load_or_create
    from kiln_device.errors import AgentError

    tok = token(backend, tmp_path / "tok")
    with running_swtpm(tmp_path / "tpm") as tpm:
        monkeypatch.setenv("TPM2TOOLS_TCTI", tpm.tcti)
        dev = SimDevice.create(tmp_path / "d", service, tok, identity="auto")  # auto: a TPM is here, it is used
        ident = dev.identity
        assert (ident.key_type, ident.store, ident.tpm_handle) == ("ecdsa-p256", "tpm", TPM_HANDLE)
        assert hex(TPM_HANDLE) in tpm.persistent()
        assert not (dev.config.identity_dir / KEY_FILE).exists() and (dev.config.identity_dir / TPM_FILE).exists()
        for n in range(30):
            dev.emit("update.phase", version="1.1.0", phase=f"p{n}")
        assert dev.report() == 0, dev.outbox.meta()
        assert [e["phase"] for e in stored(backend, ident.id)] == [f"p{n}" for n in range(30)]
        store = open_store(backend)
        try:
            assert store.device_key(ident.id)[2] == "ecdsa-p256"  # type: ignore[index]
        finally:
            store.close()
        assert service.get("/v1/status?class=tiny")["classes"]["tiny"]["keys"]["ecdsa-p256"] >= 1
        # A software P-256 key cannot report under the TPM key's device id.
        body = json.dumps({"device": ident.id, "counter": 10**6, "events": [
            {"seq": 99, "kind": "boot", "time": "2026-11-30T00:00:00Z"}]}).encode()
        from cryptography.hazmat.primitives import hashes
        forged = base64.b64encode(ec.generate_private_key(ec.SECP256R1()).sign(
            SIGNING_CONTEXT + body, ec.ECDSA(hashes.SHA256()))).decode()
        code, answer = service.post("/v1/reports", body, {SIGNATURE_HEADER: forged})
        assert code == 401 and "does not verify" in answer["error"], answer
        # An ed25519 key's bytes presented as a P-256 key: refused at enrollment, with the reason.
        body = json.dumps({"device": ident.id, "publicKey": base64.b64encode(b"\1" * 32).decode(),
                           "keyType": "ecdsa-p256", "token": "x", "class": "tiny", "compatible": "kiln,tiny",
                           "version": "1.0.0"}).encode()
        code, answer = service.post("/v1/enroll", body, {SIGNATURE_HEADER: "AA=="})
        assert code == 422 and "not an ecdsa-p256 public key" in answer["error"], answer
        # The identity, once made in the TPM, is never replaced by a file key.
        with pytest.raises(AgentError, match="identity is a TPM key"):
            load_or_create(dev.config.identity_dir, "file")
    with running_swtpm(tmp_path / "tpm") as tpm:  # the same TPM after a restart: the same key, the same id
        monkeypatch.setenv("TPM2TOOLS_TCTI", tpm.tcti)
        assert dev.identity.id == ident.id
        dev.emit("boot", version="1.1.0")
        assert dev.report() == 0 and stored(backend, ident.id)[-1]["kind"] == "boot"
    with running_swtpm(tmp_path / "tpm-cleared") as tpm:  # another TPM (a cleared one): said, never replaced
        monkeypatch.setenv("TPM2TOOLS_TCTI", tpm.tcti)
        with pytest.raises(AgentError, match="no longer holds this device's key"):
            load_or_create(dev.config.identity_dir, "auto")
        dev.emit("boot", version="1.1.0")
        assert dev.report() == 11 and dev.outbox.count() == 1  # kept for when the key is back; said in status
        assert "no longer holds this device's key" in dev.outbox.meta()["lastError"]
    # A TPM whose handle another program took: `tpm` says so; `auto` makes a key file (nothing was recorded).
    with running_swtpm(tmp_path / "tpm-taken") as tpm:
        monkeypatch.setenv("TPM2TOOLS_TCTI", tpm.tcti)
        env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti}
        subprocess.run(["tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048", "-c", str(tmp_path / "other.ctx")],
                       env=env, check=True, capture_output=True)
        subprocess.run(["tpm2_evictcontrol", "-C", "o", "-c", str(tmp_path / "other.ctx"), hex(TPM_HANDLE)], env=env,
                       check=True, capture_output=True)
        subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)
        with pytest.raises(AgentError, match="holds another key"):
            load_or_create(tmp_path / "taken-tpm", "tpm")
        fallback = load_or_create(tmp_path / "taken-auto", "auto")
        assert (fallback.key_type, fallback.store) == ("ed25519", "file")
        assert tpm.persistent() == [hex(TPM_HANDLE)]  # the other program's key is still there
    # One key, one id: the same P-256 key with its point compressed is refused (it would name a second device).
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    point = load_der_public_key(ident.public_key).public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    # cryptography writes only the uncompressed form: the SPKI of the compressed point is built by hand.
    spki_compressed = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200") + point
    assert load_der_public_key(spki_compressed).public_numbers() == \
        load_der_public_key(ident.public_key).public_numbers()  # type: ignore[union-attr]
    from kiln_device.fleet import device_id as id_of

    body = json.dumps({"device": id_of(spki_compressed), "publicKey": base64.b64encode(spki_compressed).decode(),
                       "keyType": "ecdsa-p256", "token": "x", "class": "tiny", "compatible": "kiln,tiny",
                       "version": "1.0.0"}).encode()
    code, answer = service.post("/v1/enroll", body, {SIGNATURE_HEADER: "AA=="})
    assert code == 422 and "uncompressed point" in answer["error"], answer
    monkeypatch.delenv("TPM2TOOLS_TCTI")
    with pytest.raises(AgentError, match=r"fleet\.identity is tpm, but no TPM"):
        load_or_create(tmp_path / "no-tpm", "tpm")
    assert load_or_create(tmp_path / "no-tpm", "auto").key_type == "ed25519"  # auto without a TPM: a key file


# --- the real agent: reports, rollouts, the window -------------------------------------------------------


@pytest.fixture(scope="module")
def halting(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetService, str]]:
    """A SQLite fleet service holding the rollout and online keys: it halts rollouts by itself."""
    tmp = tmp_path_factory.mktemp("halting")
    db = f"sqlite:///{tmp / 'fleet.db'}"
    with running_fleet(tmp, db, key_dir=world.trust_keys, lookaside=world.lookaside) as svc:
        kiln("fleet", "allow", "tiny", "--any-device", "--db", db, check=True)
        yield svc, db


def fleet_device(world: World, name: str, svc: FleetService, db: str, **kw: str) -> object:
    dev = world.device(name, **kw)
    etc = dev.root / "etc/kiln"
    etc.mkdir(parents=True, exist_ok=True)
    shutil.copy(svc.ca, etc / "fleet-ca.pem")
    token(db, etc / "enroll.token")
    (etc / "agent.json").write_text(json.dumps({"fleet": {"url": svc.url, "ca": str(etc / "fleet-ca.pem"),
                                                          "token": str(etc / "enroll.token")}}))
    return dev


def device_id(dev: object, *, lowest: float = 0.0) -> str:
    """The device's id; with LOWEST, its identity is made again until its place is at least that (a first
    wave can then leave it out)."""
    while True:
        proc = dev.agent("identity")  # type: ignore[attr-defined]
        assert proc.returncode == 0, proc.stderr
        found = proc.stdout.strip()
        if place(found) >= lowest:
            return found
        shutil.rmtree(dev.root / "var/lib/kiln/identity")  # type: ignore[attr-defined]


def test_the_device_reports_its_update_and_a_dead_service_never_blocks_it(world: World, halting, tmp_path) -> None:
    svc, db = halting
    world.release("1.1.0")
    dev = fleet_device(world, "reporting", svc, db)
    agent_json = dev.root / "etc/kiln/agent.json"
    config = json.loads(agent_json.read_text())
    agent_json.write_text(json.dumps({"fleet": {**config["fleet"], "url": "https://127.0.0.1:9"}}))  # nothing there
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr
    proc = dev.agent("report")
    assert proc.returncode == EXIT["unreachable"] and "next attempt in" in proc.stderr, proc.stderr
    assert dev.agent("report").returncode == 0  # backing off: no attempt, no error
    status = json.loads(dev.agent("status", "--json").stdout)["fleet"]
    assert status["outbox"] >= 9 and status["failures"] == 1 and "127.0.0.1:9" in status["lastError"]
    agent_json.write_text(json.dumps(config))  # the link is back
    proc = dev.agent("report", "--now")
    assert proc.returncode == 0, proc.stderr
    kinds = [(e["kind"], e.get("phase")) for e in stored(db, device_id(dev))]
    assert kinds == [("update.started", None), *[("update.phase", p) for p in
                     ("fetched", "invalidated", "built", "written", "verified", "kernel", "entry")],
                     ("update.installed", None)], kinds
    assert json.loads(dev.agent("status", "--json").stdout)["fleet"]["outbox"] == 0


def stages_for(device_places: list[float], *, inside: bool) -> list[dict[str, float]]:
    """Two waves: the first holds every place given (inside) or none of them."""
    first = int(max(device_places)) + 1 if inside else max(1, int(min(device_places)))
    assert 1 <= first < 100
    return [{"percent": first, "soakHours": 0}, {"percent": 100, "soakHours": 0}]


def test_waves_the_automatic_halt_and_resume(world: World, halting, tmp_path: Path) -> None:
    svc, db = halting
    repo = world.repo
    # 2.0.0 opens wave 1 only; this device is in wave 2: it waits, then advance lets it in.
    dev = fleet_device(world, "waves", svc, db)
    me = device_id(dev, lowest=1.0)  # a first wave of at least 1% can leave it out
    world.release("1.1.0")  # for every wave (no rollout of its own)
    world.release("2.0.0")
    stages = stages_for([place(me)], inside=False)
    rollout.start(repo, "tiny", "stable", "2.0.0", rollout.policy(stages, 0.2, 3))
    assert wave_of(me, [s["percent"] for s in stages]) == 2
    before = slots(dev)
    # A channel whose only release waits for another wave: nothing is installed, exit 14 (waiting).
    world.release("5.0.0", "gated")
    rollout.start(repo, "tiny", "gated", "5.0.0", rollout.policy(stages, 0.2, 3))
    gated = tmp_path / "gated.json"
    gated.write_text(json.dumps({"channel": "gated"}))
    proc = dev.agent("--config", str(gated), "update", "--no-reboot")
    assert proc.returncode == EXIT["waiting"] and "this device is in wave 2" in proc.stderr, proc.stderr
    assert slots(dev) == before and not dev.state()["pending"]
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr  # 1.1.0, released earlier to every wave, is still an update
    assert json.loads(dev.agent("status", "--json").stdout)["pending"]["version"] == "1.1.0"
    assert "this device is in wave 2" in json.loads(dev.agent("status", "--json").stdout)["trust"]["waiting"]
    kiln("rollout", "advance", "tiny", "--channel", "stable", "--key", str(world.trust_keys), "--lookaside",
         str(world.lookaside), check=True)
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr
    assert json.loads(dev.agent("status", "--json").stdout)["pending"]["version"] == "2.0.0"
    assert slots(dev)["a"] == before["a"]

    # 3.0.0: three devices of wave 1 roll back; the service halts the rollout by itself.
    sims: list[SimDevice] = []
    tries = 0
    tok = token(db, tmp_path / "sims-token", uses=100)
    while len(sims) < 23:
        tries += 1
        sim = SimDevice.create(tmp_path / f"sim{tries}", svc, tok)
        if place(sim.identity.id) < 90:
            sims.append(sim)
    waiting = fleet_device(world, "halted", svc, db)
    world.release("3.0.0")
    stages = stages_for([place(s.identity.id) for s in sims], inside=True)
    rollout.start(repo, "tiny", "stable", "3.0.0", rollout.policy(stages, 0.2, 3))
    for sim in sims[3:]:  # 20 devices of wave 1 that only waited (a busy window): they did not try 3.0.0
        sim.emit("rollout.waiting", version="3.0.0", reason="maintenance window closed")
        sim.emit("update.downloaded", version="3.0.0")
        assert sim.report() == 0
    for n, sim in enumerate(sims[:3]):
        sim.emit("update.started", version="3.0.0")
        sim.emit("rollback", version="3.0.0", reason="kiln-health-inference: golden check failed")
        assert sim.report() == 0
        state = repo.rollout("tiny", "stable")
        assert bool(state["halted"]) == (n == 2), state  # two of two is over 20%, but fewer than haltMinDevices
    assert "3 of 3 devices in wave 1 failed" in state["halted"]["reason"]
    assert "golden check failed" in state["halted"]["reason"]
    # The halt is in the signed metadata: the device learns it without the service (its URL leads nowhere).
    (waiting.root / "etc/kiln/agent.json").write_text(json.dumps({"fleet": {"url": "https://127.0.0.1:9"}}))
    proc = waiting.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr  # it takes 2.0.0, the newest it may
    st = json.loads(waiting.agent("status", "--json").stdout)
    assert st["pending"]["version"] == "2.0.0" and "halted" in st["trust"]["waiting"]
    kinds = [json.loads(p.read_text())["kind"] for p in sorted((waiting.root / "var/lib/kiln/agent/outbox")
                                                                .glob("0*.json"))]
    assert kinds[0] == "rollout.waiting" and "update.installed" in kinds  # kept for when the link is back
    keys = ("--key", str(world.trust_keys), "--lookaside", str(world.lookaside))
    proc = kiln("rollout", "advance", "tiny", "--channel", "stable", *keys, check=False)
    assert proc.returncode != 0 and "halted" in proc.stderr
    out = kiln("rollout", "status", "tiny", "--channel", "stable", "--lookaside", str(world.lookaside),
               "--db", db, check=True).stdout
    assert "HALTED" in out and "3 failed" in out
    status = json.loads(kiln("fleet", "status", "tiny", "--json", "--db", db, "--lookaside",
                             str(world.lookaside), check=True).stdout)
    r = status["classes"]["tiny"]["rollouts"]["stable"]
    assert r["halted"] and r["failed"] == 3 and r["topReasons"][0]["devices"] == 3
    assert status["classes"]["tiny"]["halts"][0]["version"] == "3.0.0"
    kiln("rollout", "resume", "tiny", "--channel", "stable", *keys, check=True)
    assert not repo.rollout("tiny", "stable")["halted"]
    kiln("rollout", "halt", "tiny", "--channel", "stable", *keys, "--reason", "by hand", check=True)

    # 4.0.0 replaces the halted 3.0.0; a device outside 4.0.0's first wave never falls back to 3.0.0.
    late = fleet_device(world, "after-halt", svc, db)
    late_place = place(device_id(late, lowest=1.0))
    world.release("4.0.0")
    rollout.start(repo, "tiny", "stable", "4.0.0",
                  rollout.policy(stages_for([late_place], inside=False), 0.2, 3))
    assert repo.rollout("tiny", "stable")["closed"][-1] == {"version": "3.0.0", "wave": 1, "halted": True}
    proc = late.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr
    st = json.loads(late.agent("status", "--json").stdout)
    assert st["pending"]["version"] == "2.0.0", st["pending"]  # not the halted 3.0.0
    # A halt decided for 3.0.0 (the service, a moment late) does not halt 4.0.0.
    rollout.halt(repo, "tiny", "stable", "late", by="test", version="3.0.0")
    assert not repo.rollout("tiny", "stable")["halted"]


def test_auto_promote_opens_the_next_wave_after_a_clean_soak(world: World, halting, tmp_path: Path) -> None:
    """rollout.autoPromote: the service (ticking every second here) opens wave 2 once haltMinDevices of wave 1
    have tried within the failure rate, and never before."""
    import time

    svc, db = halting
    repo = world.repo
    tok = token(db, tmp_path / "tok", uses=100)
    sims: list[SimDevice] = []
    while len(sims) < 3:  # devices that a first wave can hold with room left for a second
        sim = SimDevice.create(tmp_path / f"s{len(list(tmp_path.iterdir()))}", svc, tok)
        if place(sim.identity.id) < 90:
            sims.append(sim)
    world.release("7.0.0", "auto")
    stages = stages_for([place(s.identity.id) for s in sims], inside=True)
    rollout.start(repo, "tiny", "auto", "7.0.0", rollout.policy(stages, 0.2, 3, auto_promote=True))
    sims[2].emit("boot", version="1.0.0", slot="a")  # enrolled: wave 1 holds at least these three devices
    assert sims[2].report() == 0
    for sim in sims[:2]:
        sim.emit("update.started", version="7.0.0")
        sim.emit("update.success", version="7.0.0")
        assert sim.report() == 0
    time.sleep(3)  # three ticks: two devices tried, haltMinDevices is 3
    assert repo.rollout("tiny", "auto")["wave"] == 1
    sims[2].emit("update.started", version="7.0.0")
    sims[2].emit("update.success", version="7.0.0")
    assert sims[2].report() == 0
    deadline = time.monotonic() + 30
    while repo.rollout("tiny", "auto")["wave"] == 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    state = repo.rollout("tiny", "auto")
    assert state["wave"] == 2 and len(state["opened"]) == 2 and not state["halted"], state


def test_a_wave_without_evidence_is_never_promoted(world: World, halting, tmp_path: Path) -> None:
    """Finding (issue 33, 3): a first wave that holds no device at all passed `tried >= min(haltMinDevices,
    devices in the open waves)` as 0 >= 0, and the service promoted the release to the next wave on no evidence.
    It waits for successes, and `kiln fleet status` says what for."""
    import time

    _, db = halting
    world.release("9.0.0", "ghost")  # a release signed with the rollout key's delegation in place
    stages = [{"percent": 10, "soakHours": 0}, {"percent": 100, "soakHours": 0}]
    rollout.start(world.repo, "ghost", "auto", "1.0.0", rollout.policy(stages, 0.2, 3, auto_promote=True))
    time.sleep(3)  # three of the service's ticks
    assert world.repo.rollout("ghost", "auto")["wave"] == 1
    out = kiln("fleet", "status", "ghost", "--db", db, "--lookaside", str(world.lookaside), check=True).stdout
    assert "auto-promotion waits for evidence: 0 of the 1 successes it needs in the open waves" in out, out


def test_outside_the_window_the_update_is_only_downloaded(world: World, tmp_path: Path) -> None:
    import time

    world.release("1.1.0")
    dev = world.device("window")
    hour = time.gmtime().tm_hour
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"
    (dev.root / "etc/kiln").mkdir(parents=True, exist_ok=True)
    (dev.root / "etc/kiln/agent.json").write_text(json.dumps({"window": closed}))
    before = slots(dev)
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["waiting"] and "maintenance window" in proc.stderr, proc.stderr
    assert slots(dev) == before
    st = dev.state()
    assert st["pending"]["phase"] == "fetched"
    assert any((dev.root / "var/lib/kiln/oci/blobs/sha256").iterdir())
    opened = f"{hour:02d}:00-{(hour + 1) % 24:02d}:00"
    (dev.root / "etc/kiln/agent.json").write_text(json.dumps({"window": opened}))
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == EXIT["ok"], proc.stderr
    assert sha(dev.slot("a")) == before["a"] and sha(dev.slot("b")) != before["b"]
    (dev.root / "etc/kiln/agent.json").write_text(json.dumps({"window": "25:00-01:00"}))
    proc = dev.agent("check")
    assert proc.returncode == 11 and "HH:MM-HH:MM" in proc.stderr


def test_the_fleet_sees_which_devices_boot_verified(halting, tmp_path: Path) -> None:
    """Issue 32: each boot event says the firmware's Secure Boot state and the root digest the signed UKI
    binds; the service keeps the last one per device and lists the devices that do not boot verified."""
    svc, db = halting
    digest = "sha256:" + "ab" * 32
    good = SimDevice.create(tmp_path / "good", svc, token(db, tmp_path / "tok1"))
    good.emit("boot", version="1.0.0", slot="a", secureBoot="enabled", rootDigest=digest)
    off = SimDevice.create(tmp_path / "off", svc, token(db, tmp_path / "tok2"))
    off.emit("boot", version="1.0.0", slot="a", secureBoot="disabled", rootDigest=None)
    assert good.report() == 0 and off.report() == 0
    tiny = svc.get("/v1/status")["classes"]["tiny"]
    listed = {d["device"]: d for d in tiny["deviceList"]}
    assert (listed[good.identity.id]["secureBoot"], listed[good.identity.id]["rootDigest"]) == ("enabled", digest)
    unverified = {d["device"] for d in tiny["unverified"]}
    assert off.identity.id in unverified and good.identity.id not in unverified
    text = kiln("fleet", "status", "--db", db, check=True).stdout
    assert "boot not verified:" in text


def test_the_fleet_page_in_chromium(halting, tmp_path: Path) -> None:
    svc, db = halting
    chromium = shutil.which("chromium") or require_tool("chromium")
    dev = SimDevice.create(tmp_path / "d", svc, token(db, tmp_path / "tok"))
    dev.emit("boot", version="1.0.0", slot="a", degraded="no GPU: running on the CPU")
    assert dev.report() == 0
    shot = tmp_path / "fleet.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
              "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([*common, "--dump-dom", svc.operator_url + "/"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    shown = svc.get("/v1/status")
    assert f"{shown['devices']} devices" in dom
    tiny = shown["classes"]["tiny"]
    assert f"<span class=\"devices\">{tiny['devices']}</span>" in dom
    for version, n in tiny["versions"].items():
        assert f"<td>{version}</td><td>{n}</td>" in dom
    assert f"degraded: <span class=\"degraded\">{len(tiny['degraded'])}</span>" in dom
    for channel, r in tiny["rollouts"].items():
        assert f"rollout of {r['version']} on {channel}" in dom
    for h in tiny["halts"]:  # what the service halted, even once a release replaced it
        shown = f"{h['version']} on {h['channel']}: {h['reason']}"
        assert shown.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in dom  # as the DOM has text
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,900", svc.operator_url + "/"],
                   capture_output=True,
                   timeout=120, check=True, cwd=tmp_path)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_batch_token_enrolls_pending_devices_whose_reports_never_count(world: World, tmp_path: Path) -> None:
    """Finding (issue 33, 2): a batch token (on every device of a batch, --uses up to 1,000,000) enrolled
    brand-new identities at will: 3 made-up ones signed a halt into the channel, 12 made-up successes would
    promote a release. New identities now wait as pending: their reports are refused and never stored, so
    they count for nothing until an operator accepts them; and the token is gone from each device once used."""
    import time

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    with running_fleet(tmp_path / "svc", db, key_dir=world.trust_keys, lookaside=world.lookaside) as svc:
        tok = token(db, tmp_path / "batch-token", uses=100)
        farmed: list[SimDevice] = []
        while len(farmed) < 15:
            sim = SimDevice.create(tmp_path / f"farmed{len(list(tmp_path.glob('farmed*')))}", svc, tok)
            if place(sim.identity.id) < 50:
                farmed.append(sim)
        world.release("11.0.0", "farm")
        stages = stages_for([place(s.identity.id) for s in farmed], inside=True)
        rollout.start(world.repo, "tiny", "farm", "11.0.0", rollout.policy(stages, 0.2, 3, auto_promote=True))
        for n, sim in enumerate(farmed):
            sim.emit("update.started", version="11.0.0")
            if n < 3:
                sim.emit("rollback", version="11.0.0", reason="\x1b[2Jforged: golden check failed")
            else:
                sim.emit("update.success", version="11.0.0")
            assert sim.report() == EXIT["waiting"], sim.outbox.meta()
            assert "kiln fleet accept" in sim.outbox.meta()["lastError"] and sim.outbox.count() == 2
            assert not sim.config.fleet.token.exists()  # used once, then deleted from the device
        assert tok.exists()  # the operator's copy
        time.sleep(3)  # three of the service's ticks
        state = world.repo.rollout("tiny", "farm")
        assert not state["halted"] and state["wave"] == 1, state
        assert total(db) == 0  # nothing of a pending device is stored
        status = json.loads(kiln("fleet", "status", "tiny", "--json", "--db", db, "--lookaside",
                                 str(world.lookaside), check=True).stdout)
        assert status["devices"] == 0 and status["pending"] == 15
        assert {p["keyOrigin"] for p in status["classes"]["tiny"]["pending"]} == {"file"}
        out = kiln("fleet", "status", "tiny", "--db", db, check=True).stdout
        assert "15 new devices wait for acceptance" in out, out
        # Accepted by an operator, a device's kept reports arrive and count, as any device's do.
        kiln("fleet", "accept", *(s.identity.id for s in farmed[:3]), "--db", db, check=True)
        for sim in farmed[:3]:
            assert sim.report() == 0 and sim.outbox.count() == 0
        state = world.repo.rollout("tiny", "farm")
        assert state["halted"] and "3 of 3 devices in wave 1" in state["halted"]["reason"], state


def test_the_allow_list_names_serials_and_operators_accept_or_reject(service: FleetService, backend: str,
                                                                     tmp_path: Path) -> None:
    kiln("fleet", "allow", "listed", "--serial", "SN-0001", "--db", backend, check=True)
    assert kiln("fleet", "allow", "listed", "--list", "--db", backend, check=True).stdout.split() == ["SN-0001"]
    tok = token(backend, tmp_path / "tok", cls="listed", uses=10)
    named = SimDevice.create(tmp_path / "named", service, tok, klass="listed", serial="SN-0001")
    named.emit("boot", version="1.0.0")
    assert named.report() == 0 and named.outbox.count() == 0
    assert not named.config.fleet.token.exists()
    # A second identity claiming the same serial, and a serial the list does not name: pending.
    copy = SimDevice.create(tmp_path / "copy", service, tok, klass="listed", serial="SN-0001")
    other = SimDevice.create(tmp_path / "other", service, tok, klass="listed", serial="SN-0002")
    for dev in (copy, other):
        dev.emit("boot", version="1.0.0")
        assert dev.report() == 14 and dev.outbox.count() == 1
    pending = json.loads(kiln("fleet", "devices", "listed", "--pending", "--json", "--db", backend,
                              check=True).stdout)
    assert {(d["id"], d["serial"], d["key_origin"], d["state"]) for d in pending} == {
        (copy.identity.id, "SN-0001", "file", "pending"), (other.identity.id, "SN-0002", "file", "pending")}
    kiln("fleet", "accept", other.identity.id, "--db", backend, check=True)
    kiln("fleet", "reject", copy.identity.id, "--db", backend, check=True)
    assert other.report() == 0 and other.outbox.count() == 0 and stored(backend, other.identity.id)
    assert copy.report() == 11 and "rejected" in copy.outbox.meta()["lastError"]
    assert not stored(backend, copy.identity.id)
    r = kiln("fleet", "accept", "not-a-device", "--db", backend)
    assert r.returncode == 2 and "not device ids" in r.stderr, r.stderr
    r = kiln("fleet", "accept", "kd-" + "0" * 24, "--db", backend)
    assert r.returncode == 1 and "not enrolled here" in r.stderr, r.stderr
    # An agent from before enrollment states (no keyOrigin, no serial) still enrolls: pending, origin unknown.
    old = SimDevice.create(tmp_path / "old", None, tmp_path / "none").identity
    body = json.dumps({"device": old.id, "publicKey": old.public_b64, "token": tok.read_text().strip(),
                       "class": "listed", "compatible": "kiln,listed", "version": "1.0.0"}).encode()
    code, answer = service.post("/v1/enroll", body, {SIGNATURE_HEADER: old.sign(ENROLL_CONTEXT, body)})
    assert (code, answer["state"]) == (200, "pending"), answer
    [row] = [d for d in json.loads(kiln("fleet", "devices", "listed", "--json", "--db", backend, check=True).stdout)
             if d["id"] == old.id]
    assert (row["key_origin"], row["serial"]) == ("unknown", None)


def test_operators_have_their_own_listener_and_devices_see_only_theirs(service: FleetService, backend: str,
                                                                      tmp_path: Path) -> None:
    """Finding (issue 33, 6): /v1/status and the HTML page sat on the devices' listener without authentication,
    giving away device ids, versions, reasons and the database's path."""
    for path in ("/v1/status", "/", "/v1/status?class=tiny"):
        with pytest.raises(urllib.error.HTTPError) as err:
            service.get(path, operator=False)
        assert err.value.code == 404, path
    assert service.get("/healthz", operator=False)["ok"]
    status = service.get("/v1/status")  # the operators' listener, on the loopback
    assert "database" not in status and "devices" in status
    assert "fleet.db" not in service.get("/") and "kiln-pg" not in service.get("/")
    for path in ("/v1/enroll", "/v1/reports"):  # and the operators' listener takes no device's report
        code, _ = FleetService(service.operator_url, service.ca, service.proc, service.log).post(path, b"{}")
        assert code == 404, path
    # Off the loopback, the operators' listener needs a token; with one, every request must bear it.
    tls = tmp_path / "tls"
    kiln("fleet", "init", str(tls), "--host", "127.0.0.1", "--db", backend, check=True)
    r = kiln("fleet", "serve", "--listen", "127.0.0.1:0", "--operator-listen", "0.0.0.0:0", "--tls-dir", str(tls),
             "--db", backend, timeout=60)
    assert r.returncode == 2 and "not a loopback address" in r.stderr and "--operator-token-file" in r.stderr, \
        r.stderr
    token_file = tmp_path / "operator.token"
    token_file.write_text("s3cret-operator-token-of-some-length\n")
    with running_fleet(tmp_path, backend, operator_token=token_file) as guarded:
        with pytest.raises(urllib.error.HTTPError) as err:
            guarded.get("/v1/status")
        assert err.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as err:
            guarded.get("/v1/status", token="not-the-token-at-all")
        assert err.value.code == 401
        assert "devices" in guarded.get("/v1/status", token="s3cret-operator-token-of-some-length")
        assert guarded.get("/healthz", operator=True)["ok"]  # liveness needs no token


def test_an_outbox_whose_meta_went_back_loses_nothing_and_counts_nothing_twice(service: FleetService, backend: str,
                                                                              tmp_path: Path) -> None:
    """Finding (issue 33, 5): meta.json restored from an older copy handed out sequence numbers the service
    already held for other events; it acknowledged them as duplicates, and the device dropped them unsent."""
    dev = SimDevice.create(tmp_path / "d", service, token(backend, tmp_path / "tok"))
    for n in range(3):
        dev.emit("boot", version="1.0.0", n=n)
    backup = (dev.config.outbox_dir / "meta.json").read_bytes()  # lastSeq 3, counter 0
    assert dev.report() == 0
    for n in range(3, 6):
        dev.emit("boot", version="1.0.0", n=n)
    assert dev.report() == 0  # the service holds 1..6
    (dev.config.outbox_dir / "meta.json").write_bytes(backup)  # restored: seqs 4, 5, 6 are handed out again
    for n in range(6, 9):
        dev.emit("boot", version="1.0.0", n=n)
    assert sorted(e.seq for e in dev.outbox.pending(10)) == [4, 5, 6]
    assert dev.report() == 0, dev.outbox.meta()
    events = stored(backend, dev.identity.id)
    assert [e["n"] for e in events] == list(range(9))  # none lost, none twice, in order
    assert [e["seq"] for e in events] == list(range(1, 10)) and dev.outbox.count() == 0
    assert dev.report() == 0 and len(stored(backend, dev.identity.id)) == 9  # a retry stores nothing twice


def test_event_times_are_checked_and_a_device_clock_that_is_off_is_shown(service: FleetService, backend: str,
                                                                        tmp_path: Path) -> None:
    """Finding (issue 33, 11): an event's time was checked for its length only. A time that is no date is refused
    (422, naming the field); a clock ahead of the service's, or never set, is stored and shown; the service keeps
    the time it received each event."""
    dev = SimDevice.create(tmp_path / "d", service, token(backend, tmp_path / "tok"))
    dev.emit("boot", version="1.0.0")
    assert dev.report() == 0
    ident = dev.identity

    def post(events: list[dict[str, object]], counter: int) -> tuple[int, dict[str, object]]:
        body = json.dumps({"device": ident.id, "counter": counter, "events": events}).encode()
        return service.post("/v1/reports", body, {SIGNATURE_HEADER: ident.sign(SIGNING_CONTEXT, body)})

    code, answer = post([{"seq": 2, "kind": "boot", "time": "2026-13-45T99:99:99Z"}], 100)
    assert code == 422 and answer["error"].startswith("events[0].time"), answer
    assert [e["seq"] for e in stored(backend, ident.id)] == [1]
    code, answer = post([{"seq": 2, "kind": "boot", "time": "2099-01-01T00:00:00Z"}], 101)
    assert code == 200 and answer["accepted"] == 1, answer
    status = json.loads(kiln("fleet", "status", "tiny", "--json", "--db", backend, check=True).stdout)
    [off] = [d for d in status["classes"]["tiny"]["clockOff"] if d["device"] == ident.id]
    assert off["skewSeconds"] > 60 * 86400 * 365
    assert "clock off:" in kiln("fleet", "status", "tiny", "--db", backend, check=True).stdout
    store = open_store(backend)
    try:
        with store.tx() as cur:
            cur.execute(store.sql("SELECT time, received FROM events WHERE device = ? AND seq = 2"), (ident.id,))
            when, received = cur.fetchone()
    finally:
        store.close()
    assert when == "2099-01-01T00:00:00Z" and received.startswith("20") and received < "2099"
    dev.emit("boot", version="1.0.0")  # a clock back in order: no longer shown
    assert dev.report() == 0
    status = json.loads(kiln("fleet", "status", "tiny", "--json", "--db", backend, check=True).stdout)
    assert ident.id not in {d["device"] for d in status["classes"]["tiny"]["clockOff"]}


def test_slow_clients_are_cut_off_and_connections_are_bounded(tmp_path: Path) -> None:
    """Finding (issue 33, 10): no body-read timeout and no cap on connections: a client that sends its headers
    and then trickles (slow-loris) held a worker for as long as it liked, and any number of them could."""
    import http.client
    import ssl

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    with running_fleet(tmp_path, db, env={"KILN_FLEET_BODY_TIMEOUT": "2"}, extra=("--max-connections", "4")) as svc:
        ctx = ssl.create_default_context(cafile=str(svc.ca))
        host, port = svc.url.removeprefix("https://").split(":")

        def stalled() -> http.client.HTTPSConnection:
            conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
            conn.putrequest("POST", "/v1/reports")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", "1000")
            conn.endheaders()
            conn.send(b'{"device": ')  # and nothing more
            return conn

        start = time.monotonic()
        first = stalled()
        resp = first.getresponse()
        waited = time.monotonic() - start
        assert resp.status == 408 and "did not arrive within 2 s" in json.loads(resp.read())["error"]
        assert 1.5 < waited < 15, waited
        first.close()
        held = [stalled() for _ in range(4)]  # as many as the service serves at once
        time.sleep(0.5)
        try:
            svc.get("/healthz")
            over = None
        except urllib.error.HTTPError as exc:
            over = exc.code
        assert over == 503  # the fifth is turned away, not queued behind the stalled four
        for conn in held:
            assert conn.getresponse().status == 408
            conn.close()
        assert svc.get("/healthz")["ok"]  # the slots are back
        assert total(db) == 0


def test_deeply_nested_json_is_a_400_not_a_500(service: FleetService) -> None:
    """Finding (issue 33, 9): a body of nested arrays overflowed the JSON decoder's recursion: a 500."""
    for path in ("/v1/reports", "/v1/enroll"):
        for depth in (5_000, 300_000):
            code, answer = service.post(path, b"[" * depth + b"]" * depth)
            assert code == 400 and "nested too deeply" in answer["error"], (path, code, answer)
