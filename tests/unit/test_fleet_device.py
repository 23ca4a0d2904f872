"""The device's side of the fleet: the outbox on disk, the wave a device is in, the agent's fleet and window
settings, and the store's migrations on a real SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from builder.core.errors import UsageError
from builder.fleet.store import SCHEMA_VERSION, open_store
from kiln_device.agent.config import finalize_fleet, in_window, parse_window
from kiln_device.agent.outbox import Outbox, emit
from kiln_device.channel import parse_rollout
from kiln_device.errors import AgentError
from kiln_device.fleet import device_id, is_device_id, place, rollout_gate, wave_of
from kiln_device.typed import ContractError

pytestmark = pytest.mark.unit


def test_sequence_numbers_are_never_reused(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o", limit=100)
    assert [box.append("health", {"n": n}) for n in range(3)] == [1, 2, 3]
    sent = box.pending(10)
    box.acknowledge(3, sent)
    assert box.count() == 0
    assert box.append("health", {}) == 4  # from meta.json: the acknowledged numbers are not handed out again
    (tmp_path / "o" / "meta.json").unlink()  # meta lost: the newest file still says where we are
    assert box.append("health", {}) == 5


def test_a_keyed_event_is_recorded_once_and_acknowledged_numbers_are_kept(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    assert box.append("update.phase", {"phase": "fetched"}, key="d/t/fetched") == 1
    assert box.append("update.phase", {"phase": "fetched"}, key="d/t/fetched") == 1  # redone after a power cut
    meta = box.meta()
    del meta["keys"]  # the cut fell between the event file and meta.json: the file itself is searched
    box.save_meta(meta)
    assert box.append("update.phase", {"phase": "fetched"}, key="d/t/fetched") == 1
    assert box.count() == 1
    (event,) = box.pending(10)
    meta["lastSeq"] = 0  # meta.json was not saved after the append; the service acknowledged it anyway
    box.save_meta(meta)
    box.acknowledge(1, [event])
    assert box.append("boot", {}) == 2  # not 1 again: the service has seen 1


def test_a_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o", limit=5)
    for n in range(12):
        box.append("health", {"n": n})
    assert [e.data["n"] for e in box.pending(100)] == [7, 8, 9, 10, 11]
    assert box.meta()["dropped"] == 7


def test_a_torn_event_file_is_dropped_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    for n in range(3):
        box.append("health", {"n": n})
    (tmp_path / "o" / f"{2:012d}.json").write_bytes(b'{"seq": 2, "ti')
    assert [e.seq for e in box.pending(10)] == [1, 3]
    assert box.meta()["dropped"] == 1


def test_an_event_with_a_huge_reason_is_cut_not_lost(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    box.append("update.failed", {"reason": "x" * 100_000, "code": 9})
    (event,) = box.pending(1)
    assert event.data["code"] == 9 and len(json.dumps(event.data)) < 16 * 1024


def test_emit_never_fails_the_caller(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    emit(blocker / "outbox", 10, "boot")  # a file where the directory should be: logged, not raised
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        emit(ro / "outbox", 10, "boot")


def gate(device: str, state: dict[str, object], version: str) -> str | None:
    """rollout_gate on the state as the agent reads it from the signed rollout target."""
    return rollout_gate(device, parse_rollout(state, "the rollout target"), version)


def test_waves_are_stable_and_follow_the_stages() -> None:
    ids = [device_id(os.urandom(32)) for _ in range(2000)]
    assert all(is_device_id(i) for i in ids)
    assert place(ids[0]) == place(ids[0])
    stages = [{"percent": 10}, {"percent": 50}, {"percent": 100}]
    waves = [wave_of(i, [10, 50, 100]) for i in ids]
    share = [waves.count(w) / len(ids) for w in (1, 2, 3)]
    assert 0.07 < share[0] < 0.13 and 0.35 < share[1] < 0.45 and 0.45 < share[2] < 0.55
    first = next(i for i, w in zip(ids, waves, strict=True) if w == 1)
    third = next(i for i, w in zip(ids, waves, strict=True) if w == 3)
    state = {"version": "2.0.0", "stages": stages, "wave": 1, "halted": None}
    assert gate(first, state, "2.0.0") is None
    assert "this device is in wave 3" in (gate(third, state, "2.0.0") or "")
    assert gate(third, state, "1.9.0") is None  # another release: not this rollout's business
    assert gate(third, {**state, "wave": 3}, "2.0.0") is None
    halted = {**state, "wave": 3, "halted": {"reason": "golden check"}}
    assert "halted: golden check" in (gate(first, halted, "2.0.0") or "")
    # Replaced before they finished: a halted release is open to no one, an unfinished one to the waves it reached.
    later = {**state, "version": "2.1.0", "closed": [{"version": "2.0.0", "wave": 2, "halted": True},
                                                     {"version": "1.9.0", "wave": 1, "halted": False}]}
    assert "was halted and replaced by 2.1.0" in (gate(first, later, "2.0.0") or "")
    assert gate(first, later, "1.9.0") is None
    assert "before this device's wave" in (gate(third, later, "1.9.0") or "")
    assert gate(third, later, "1.8.0") is None  # finished before: open


def test_a_malformed_rollout_state_is_refused_naming_the_field() -> None:
    """The agent reads the signed rollout target through its record: a wave that is not a number is an error
    that names it, never a TypeError in the middle of choosing a release."""
    with pytest.raises(ContractError, match=r"^the rollout target: stages\[1\]\.percent: expected a whole number"):
        parse_rollout({"version": "2.0.0", "stages": [{"percent": 10}, {"percent": "50"}], "wave": 1},
                      "the rollout target")
    with pytest.raises(ContractError, match=r"^the rollout target: halted: expected an object"):
        parse_rollout({"version": "2.0.0", "halted": "yes"}, "the rollout target")


def test_fleet_and_window_settings_are_checked() -> None:
    assert (finalize_fleet({}).url, finalize_fleet({}).identity) == ("", "auto")
    assert finalize_fleet({"identity": "tpm"}).identity == "tpm"
    assert finalize_fleet({"url": "https://f:8443/", "outboxMax": 50, "batch": 500}).batch == 50  # <= outboxMax
    with pytest.raises(AgentError, match="from 1 to 1000"):  # what the service takes in one report
        finalize_fleet({"batch": 5000})
    for bad, says in (({"url": "http://f"}, "over TLS"), ({"outboxMax": 0}, "outboxMax"),
                      ({"batch": True}, "batch"), ({"urls": "x"}, "fleet: unknown key urls")):
        with pytest.raises(AgentError, match=says):
            finalize_fleet(bad)
    night = parse_window("22:30-02:00")
    assert night == (22 * 60 + 30, 120)
    assert in_window(night, 23 * 60) and in_window(night, 60) and not in_window(night, 12 * 60)
    assert in_window(None, 0) and in_window(parse_window("02:00-04:00"), 150)
    for bad in ("2-4", "24:00-01:00", "02:00-02:00", "02:00"):
        with pytest.raises(AgentError, match="window"):
            parse_window(bad)


def test_migrations_are_versioned_and_never_downgrade(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "fleet.db"))
    assert store.migrate() == list(range(1, SCHEMA_VERSION + 1))
    assert store.migrate() == []
    store.close()
    conn = sqlite3.connect(tmp_path / "fleet.db")
    assert [r[0] for r in conn.execute("SELECT version FROM kiln_schema ORDER BY version")] == \
        list(range(1, SCHEMA_VERSION + 1))
    conn.execute("INSERT INTO kiln_schema VALUES (?, 'x', 'from a newer Kiln')", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(UsageError, match="newer than this Kiln"):
        open_store(str(tmp_path / "fleet.db")).migrate()
    with pytest.raises(UsageError, match="expected sqlite"):
        open_store("mysql://x/y")


def test_a_database_from_before_key_types_keeps_its_devices_as_ed25519_and_accepted(tmp_path: Path) -> None:
    """Migrations 3 and 4 on a database that already has devices: they were enrolled with ed25519 keys, and
    under the rules before enrollment states, so they stay accepted (new identities start pending)."""
    from builder.fleet import store as fleet_store

    db = str(tmp_path / "fleet.db")
    old = open_store(db)
    real = fleet_store.MIGRATIONS
    try:
        fleet_store.MIGRATIONS = [m for m in real if m[0] <= 2]
        fleet_store.SCHEMA_VERSION = 2
        assert old.migrate() == [1, 2]
        with old.tx() as cur:
            cur.execute("INSERT INTO devices (id, class, compatible, public_key, enrolled) "
                        "VALUES ('kd-000000000000000000000001', 'tiny', 'kiln,tiny', 'AAAA', 'then')")
    finally:
        fleet_store.MIGRATIONS, fleet_store.SCHEMA_VERSION = real, real[-1][0]
        old.close()
    new = open_store(db)
    try:
        assert new.migrate() == list(range(3, SCHEMA_VERSION + 1))
        assert new.device_key("kd-000000000000000000000001") == ("AAAA", "tiny", "ed25519", "accepted")
        assert [(d["key_type"], d["state"], d["key_origin"]) for d in new.devices("tiny")] == \
            [("ed25519", "accepted", "unknown")]
    finally:
        new.close()


def test_sqlite_urls_are_relative_with_three_slashes_absolute_with_four(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_store("sqlite:///rel/fleet.db")
    absolute = open_store(f"sqlite:///{tmp_path / 'abs.db'}")
    try:
        assert rel.path == Path("rel/fleet.db") and (tmp_path / "rel/fleet.db").exists()  # type: ignore[attr-defined]
        assert absolute.path == tmp_path / "abs.db" and absolute.path.is_absolute()  # type: ignore[attr-defined]
    finally:
        rel.close()
        absolute.close()


def test_inference_latency_is_summarized_from_the_status_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln_device.agent.report import summarize_inference
    from kiln_device.contract import INFERENCE_STATUS, under
    from tests.fleet import SimDevice

    monkeypatch.setenv("KILN_AGENT_ROOT", str(tmp_path))
    status = under(tmp_path, INFERENCE_STATUS)
    status.parent.mkdir(parents=True)
    dev = SimDevice.create(tmp_path / "dev", None, tmp_path / "token")
    summarize_inference(dev.config, dev.outbox)
    assert dev.outbox.count() == 0  # no status file: nothing to say
    status.write_text(json.dumps({"successes": 40, "errors": 1,
                                  "latencyMs": {"window": 40, "p50": 3.1, "p95": 7.5, "p99": 9.0}}))
    summarize_inference(dev.config, dev.outbox)
    (event,) = [e.data for e in dev.outbox.pending(10)]
    assert (event["kind"], event["count"], event["p95"], event["errors"]) == ("inference.latency", 40, 7.5, 1)
    summarize_inference(dev.config, dev.outbox)  # within the interval: nothing new
    assert dev.outbox.count() == 1
    status.write_text(json.dumps({"successes": 100, "latencyMs": {"window": 100, "p50": 3, "p95": 8, "p99": 9}}))
    summarize_inference(dev.config, dev.outbox, every=0)
    assert [e.data["count"] for e in dev.outbox.pending(10)] == [40, 60]


def test_the_serial_a_device_enrolls_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """agent.json fleet.serial, else the firmware's (DMI, then the device tree); a vendor's placeholder is none."""
    from kiln_device.agent.report import device_serial
    from tests.fleet import SimDevice

    monkeypatch.setenv("KILN_AGENT_ROOT", str(tmp_path))
    dev = SimDevice.create(tmp_path / "dev", None, tmp_path / "token")
    assert device_serial(dev.config) is None
    dmi = tmp_path / "sys/class/dmi/id/product_serial"
    dmi.parent.mkdir(parents=True)
    dmi.write_text("To Be Filled By O.E.M.\n")
    dt = tmp_path / "sys/firmware/devicetree/base/serial-number"
    dt.parent.mkdir(parents=True)
    dt.write_bytes(b"1423021052345\0")
    assert device_serial(dev.config) == "1423021052345"  # the placeholder skipped, the NUL-ended dt string read
    dmi.write_text("PF3A9X7K\n")
    assert device_serial(dev.config) == "PF3A9X7K"
    named = SimDevice.create(tmp_path / "named", None, tmp_path / "token", serial="LINE4-0042")
    assert device_serial(named.config) == "LINE4-0042"
    assert finalize_fleet({"serial": "LINE4-0042"}).serial == "LINE4-0042"


def test_a_renumbering_cut_by_a_power_cut_is_finished_on_the_next_read(tmp_path: Path) -> None:
    """Outbox.rebase writes its plan to meta.json first: a power cut after some files moved loses none, twice none."""
    box = Outbox(tmp_path / "outbox", 100)
    for n in range(3):
        box.append("boot", {"n": n})
    meta = box.meta()
    meta.update(rebase={"from": [1, 2, 3], "base": 10}, lastSeq=13)
    box.save_meta(meta)  # the plan is saved; then the first file moved, and the power went out
    first = json.loads((tmp_path / "outbox/000000000001.json").read_text())
    (tmp_path / "outbox/000000000011.json").write_text(json.dumps({**first, "seq": 11}))
    (tmp_path / "outbox/000000000001.json").unlink()
    assert [(e.seq, e.data["n"]) for e in box.pending(10)] == [(11, 0), (12, 1), (13, 2)]
    assert "rebase" not in box.meta() and box.meta()["lastSeq"] == 13
    assert box.rebase(20) == 3 and [e.seq for e in box.pending(10)] == [21, 22, 23]
    assert box.append("boot", {"n": 3}) == 24  # never a number handed out before
