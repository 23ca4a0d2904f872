"""Pure logic of the device agent: versions, decisions, entries, the state journal, boot reconciliation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kiln_device.agent import reconcile
from kiln_device.agent.bootctl import BootControl, NvBootCtrl
from kiln_device.agent.config import Config
from kiln_device.agent.errors import AgentError
from kiln_device.agent.journal import State
from kiln_device.agent.oci import gc_layout, verified_labels
from kiln_device.agent.reconcile import cmd_boot
from kiln_device.agent.versions import Candidate, candidate_from_labels, compare_versions, decide
from kiln_device.contract import (
    BLOCKLISTED,
    INCOMPATIBLE,
    NOT_NEWER,
    OK,
    UP_TO_DATE,
    Entry,
    Release,
    entry_name,
    parse_entry_name,
    read_cmdline_slot,
    render_entry,
)
from tests.conftest import ROOT


@pytest.mark.parametrize(("a", "b", "order"), [
    ("1.0.0", "1.0.0", 0),
    ("1.0.1", "1.0.0", 1),
    ("1.10.0", "1.9.0", 1),
    ("1.2", "1.2.0", 0),
    ("2.0.0-rc.1", "2.0.0", -1),
    ("2.0.0~rc1", "2.0.0", -1),
    ("2.0.0-rc.2", "2.0.0-rc.10", -1),
    ("1.0.0+build.5", "1.0.0", 0),
    ("1.0.0_build.5", "1.0.0+build.5", 0),
    ("0.0.0-dev", "0.0.1", -1),
    ("2024.05.1", "2024.5.0", 1),
    ("1.0.0-alpha", "1.0.0-beta", -1),
])
def test_compare_versions(a: str, b: str, order: int) -> None:
    assert compare_versions(a, b) == order
    assert compare_versions(b, a) == -order


RUNNING = Release(cls="c", compatible="kiln,c", version="2.0.0", min_version="1.5.0")


def cand(version: str = "2.1.0", compatible: str = "kiln,c", min_version: str | None = None) -> Any:
    return Candidate(version=version, compatible=compatible, digest="sha256:" + "a" * 64, min_version=min_version)


@pytest.mark.parametrize(("candidate", "blocklist", "code", "reason"), [
    (cand(), [], OK, "newer"),
    (cand(compatible="kiln,other"), [], INCOMPATIBLE, "is not this device's"),
    (cand(compatible="kiln,other", version="1.0.0"), ["1.0.0"], INCOMPATIBLE, "compatible"),  # first wins
    (cand(version="2.0.0"), [], UP_TO_DATE, "running version"),
    (cand(version="2.0.0+rebuild"), [], UP_TO_DATE, "running version"),
    (cand(version="1.9.0"), [], NOT_NEWER, "older"),
    (cand(version="2.1.0"), ["2.1.0"], BLOCKLISTED, "failed on this device"),
    (cand(version="2.1.0"), ["sha256:" + "a" * 64], BLOCKLISTED, "failed on this device"),
    (cand(min_version="2.0.5"), [], NOT_NEWER, "needs 2.0.5 or newer running"),
    (cand(min_version="2.0.0"), [], OK, "newer"),
])
def test_decision_table(candidate: Any, blocklist: list[str], code: int, reason: str) -> None:
    decision = decide(RUNNING, candidate, blocklist)
    assert (decision.code, decision.take) == (code, code == OK)
    assert reason in decision.reason


def test_below_running_min_version_is_refused() -> None:
    running = Release(cls="c", compatible="kiln,c", version="1.0.0", min_version="3.0.0")
    assert decide(running, cand(version="2.0.0")).code == NOT_NEWER


def test_candidate_needs_kiln_labels() -> None:
    with pytest.raises(AgentError) as exc:
        candidate_from_labels({"dev.kiln.compatible": "kiln,c"}, "sha256:" + "b" * 64)
    assert exc.value.code == INCOMPATIBLE


@pytest.mark.parametrize(("name", "version", "slot", "left", "done", "blessed"), [
    ("kiln-1.0.0-a.conf", "1.0.0", "a", None, None, True),
    ("kiln-1.0.0-b+3.conf", "1.0.0", "b", 3, None, False),
    ("kiln-1.0.0-rc.1-b+2-1.conf", "1.0.0-rc.1", "b", 2, 1, False),
    ("kiln-2.0-a+0-3.conf", "2.0", "a", 0, 3, False),
])
def test_entry_names(name: str, version: str, slot: str, left: int | None, done: int | None,
                     blessed: bool) -> None:
    entry = parse_entry_name(name)
    assert entry is not None
    assert (entry.version, entry.slot, entry.tries_left, entry.tries_done, entry.blessed) == \
        (version, slot, left, done, blessed)
    if done is None:
        assert entry_name(version, slot, left) == name


@pytest.mark.parametrize("name", ["loader.conf", "debian-1.conf", "kiln-1.0.0-c.conf", "kiln-1.0.0-a.conf~"])
def test_foreign_entries_are_ignored(name: str) -> None:
    assert parse_entry_name(name) is None


def test_entry_matches_what_kiln_disk_writes() -> None:
    from builder.disk import finalize_entry

    kwargs: dict[str, Any] = {"version": "1.2.0", "slot": "b", "kargs": ("console=ttyS0", "panic=10")}
    ours = render_entry(cls="qemu-x86_64", partuuid="0000-1", **kwargs)
    theirs = finalize_entry(class_name="qemu-x86_64", root_partuuid="0000-1", **kwargs)
    assert ours == theirs


@pytest.mark.parametrize(("cmdline", "slot"), [
    ("root=PARTUUID=x ro kiln.slot=b quiet", "b"), ("BOOT_IMAGE=x kiln.slot=a", "a"),
    ("kiln.slot=c", None), ("quiet", None),
])
def test_cmdline_slot(cmdline: str, slot: str | None) -> None:
    assert read_cmdline_slot(cmdline) == slot


def test_nvbootctrl_is_not_pretending() -> None:
    with pytest.raises(NotImplementedError, match="not implemented"):
        NvBootCtrl(None)


# --- the state journal and boot reconciliation -----------------------------------------------


class FakeBoot(BootControl):
    name = "fake"

    def __init__(self, slot: str, entries: list[str]) -> None:
        self.slot, self.names = slot, entries

    def booted_slot(self) -> str | None:
        return self.slot

    def selected_entry(self) -> str | None:
        return None

    def entries(self) -> list[Any]:
        return [e for e in map(parse_entry_name, self.names) if e]

    def remove_slot_entries(self, slot: str) -> list[str]:
        gone = [n for n in self.names if (parse_entry_name(n) or Entry(n, "", "", None, None)).slot == slot]
        self.names = [n for n in self.names if n not in gone]
        return gone


def config(tmp_path: Path, boot_id: str = "boot-2") -> Any:
    (tmp_path / "boot_id").write_text(boot_id)
    return Config(registry="r:5000", repository="kiln/c", channel="stable", lookaside="http://l", insecure=True,
                     policy=tmp_path / "p", release=tmp_path / "r", state_dir=tmp_path, oci_dir=tmp_path / "o",
                     work_dir=tmp_path / "w", esp=tmp_path / "esp", slots={"a": tmp_path / "a", "b": tmp_path / "b"},
                     partuuids={}, cmdline=tmp_path / "c", efivars=tmp_path / "e", boot_id=tmp_path / "boot_id",
                     reboot_command=("true",))


def installed_state(tmp_path: Path) -> Any:
    state = State(tmp_path / "state.json")
    state.data["pending"] = {"version": "2.1.0", "digest": "sha256:" + "c" * 64, "slot": "b", "from": "2.0.0",
                             "phase": "entry", "phases": {}, "bootId": "boot-1"}
    state.save()
    return State(tmp_path / "state.json")


def test_journal_is_durable_and_resumable(tmp_path: Path) -> None:
    state = State(tmp_path / "state.json")
    state.data["pending"] = {"version": "2.1.0", "phases": {}}
    state.journal("fetched")
    state.journal("invalidated", removedEntries=["x"])
    again = State(tmp_path / "state.json")
    assert again.phase_done("fetched") and again.phase_done("invalidated") and not again.phase_done("built")
    assert again.pending["phase"] == "invalidated" and again.pending["removedEntries"] == ["x"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_state_starts_over_trusting_nothing(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"schema": 1, "slots": {"b": {"dig')
    state = State(tmp_path / "state.json")
    assert state.trust("b") is None and state.pending is None
    assert (tmp_path / "state.json.corrupt").exists()


def test_same_boot_is_not_a_rollback(tmp_path: Path) -> None:
    state = installed_state(tmp_path)
    out = cmd_boot(config(tmp_path, "boot-1"), RUNNING, state, FakeBoot("a", ["kiln-2.1.0-b+3.conf"]))
    assert "next reboot" in out and state.pending is not None and not state.data["rollbacks"]


def test_trial_boot_waits_then_blessed_boot_succeeds(tmp_path: Path) -> None:
    state = installed_state(tmp_path)
    new = Release(cls="c", compatible="kiln,c", version="2.1.0")
    out = cmd_boot(config(tmp_path), new, state, FakeBoot("b", ["kiln-2.0.0-a.conf", "kiln-2.1.0-b+2-1.conf"]))
    assert "waiting" in out and state.pending is not None
    out = cmd_boot(config(tmp_path), new, state, FakeBoot("b", ["kiln-2.0.0-a.conf", "kiln-2.1.0-b.conf"]))
    assert "update complete" in out
    assert state.pending is None and state.data["lastResult"]["result"] == "success"


def test_booting_the_other_slot_is_a_rollback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "failed_boot_reason",
                        lambda installed_in=None: "kiln-health-inference.service: outputs wrong")
    state = installed_state(tmp_path)
    boot = FakeBoot("a", ["kiln-2.0.0-a.conf", "kiln-2.1.0-b+0-3.conf"])
    cmd_boot(config(tmp_path), RUNNING, state, boot)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["pending"] is None and saved["lastResult"]["result"] == "rolled-back"
    assert saved["rollbacks"][0]["reason"] == "kiln-health-inference.service: outputs wrong"
    assert {"2.1.0", "sha256:" + "c" * 64} <= set(saved["blocklist"])
    assert boot.names == ["kiln-2.0.0-a.conf"] and saved["slots"]["b"] is None


def test_gc_keeps_shared_blobs(tmp_path: Path) -> None:
    from tests.ota import make_oci_image

    base = {"usr/base": b"x" * 1000}
    make_oci_image(tmp_path, "1", {"v": b"1"}, {}, base=base)
    make_oci_image(tmp_path, "2", {"v": b"2"}, {}, base=base)
    before = len(list((tmp_path / "blobs/sha256").iterdir()))
    freed = gc_layout(tmp_path, ["2"])
    after = len(list((tmp_path / "blobs/sha256").iterdir()))
    assert freed > 0 and before - after == 3  # manifest, config and top layer of 1; the base layer stays
    assert verified_labels(tmp_path, "2") == {}


# --- the build side's trust files (builder.signing), rendered without gpg -----------------------


def test_policy_requires_the_release_key_for_every_docker_image() -> None:
    from builder.signing import render_policy, signed_identity

    policy = json.loads(render_policy("qemu-x86_64"))
    assert policy["default"] == [{"type": "reject"}]
    (rule,) = policy["transports"]["docker"][""]
    assert rule["type"] == "signedBy" and rule["keyPath"] == "/usr/lib/kiln/release-key.asc"
    assert rule["signedIdentity"] == {"type": "exactRepository", "dockerRepository": signed_identity("qemu-x86_64")}


def test_registries_d_and_lookaside_layout() -> None:
    from builder.signing import render_registries_d, signature_path

    text = render_registries_d("http://10.0.2.2:8000", scope="10.0.2.2:5000", staging="file:///s")
    assert 'docker:\n  "10.0.2.2:5000":\n    lookaside: "http://10.0.2.2:8000"\n    lookaside-staging: "file:///s"' \
        in text
    assert "default-docker:\n  lookaside: " in render_registries_d("http://x")
    assert signature_path(Path("/s"), "kiln/c", "sha256:" + "a" * 64) == \
        Path("/s/kiln/c@sha256=" + "a" * 64 + "/signature-1")


def test_signing_keys_stay_out_of_the_project() -> None:
    from builder.errors import UsageError
    from builder.signing import make_signing_key

    with pytest.raises(UsageError, match="inside the project"):
        make_signing_key(ROOT / "keys")
