"""Pure logic of the device agent: versions, decisions, entries, the state journal, boot reconciliation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from kiln_device.agent import reconcile
from kiln_device.agent.bootctl import BootControl, NvBootCtrl, SystemdBoot
from kiln_device.agent.config import Config
from kiln_device.agent.journal import State
from kiln_device.agent.reconcile import cmd_boot
from kiln_device.agent.versions import Candidate, candidate_from_labels, compare_versions, decide, version_key
from kiln_device.contract import (
    BAD_IMAGE,
    BLOCKLISTED,
    INCOMPATIBLE,
    LABEL_CLASS,
    LABEL_COMPATIBLE,
    LABEL_DEVELOPMENT,
    LABEL_MIN_VERSION,
    LABEL_VERSION,
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
from kiln_device.errors import AgentError
from kiln_device.oci_layout import gc_layout, verified_labels
from tests.conftest import ROOT


@pytest.mark.parametrize(("a", "b", "order"), [
    ("1.0.0", "1.0.0", 0),
    ("1.0.1", "1.0.0", 1),
    ("1.10.0", "1.9.0", 1),
    ("2.0.0-rc.1", "2.0.0", -1),
    ("2.0.0-rc.2", "2.0.0-rc.10", -1),
    ("0.0.0-dev", "0.0.1", -1),
    ("2024.5.1", "2024.5.0", 1),
    ("1.0.0-alpha", "1.0.0-beta", -1),
    # A running image of the old grammar is ordered as systemd-boot orders its entry (issue 13):
    ("v1.0", "99.0.0", -1),
    ("1.0.0+build.5", "1.0.0", 1),
    ("1.0.0-rc.1", "1.0.0~rc.1", 0),
])
def test_compare_versions(a: str, b: str, order: int) -> None:
    assert compare_versions(a, b) == order
    assert compare_versions(b, a) == -order


RUNNING = Release(cls="c", compatible="kiln,c", version="2.0.0", min_version="1.5.0")


def cand(version: str = "2.1.0", compatible: str = "kiln,c", min_version: str | None = None,
         development: bool | None = None) -> Any:
    return Candidate(version=version, compatible=compatible, digest="sha256:" + "a" * 64, min_version=min_version,
                     development=development)


@pytest.mark.parametrize(("candidate", "blocklist", "code", "reason"), [
    (cand(), [], OK, "newer"),
    (cand(compatible="kiln,other"), [], INCOMPATIBLE, "is not this device's"),
    (cand(compatible="kiln,other", version="1.0.0"), ["1.0.0"], INCOMPATIBLE, "compatible"),  # first wins
    (cand(version="2.0.0"), [], UP_TO_DATE, "running version"),
    (cand(version="1.9.0"), [], NOT_NEWER, "older"),
    (cand(version="2.1.0"), ["2.1.0"], BLOCKLISTED, "failed on this device"),
    (cand(version="2.1.0"), ["sha256:" + "a" * 64], BLOCKLISTED, "failed on this device"),
    (cand(min_version="2.0.5"), [], NOT_NEWER, "needs 2.0.5 or newer running"),
    (cand(min_version="2.0.0"), [], OK, "newer"),
    # Finding 4: a production device (RUNNING) never takes a development image.
    (cand(development=True), [], INCOMPATIBLE, "development image"),
    (cand(development=True, version="1.0.0"), ["1.0.0"], INCOMPATIBLE, "development image"),  # before the rest
    (cand(development=False), [], OK, "newer"),
])
def test_decision_table(candidate: Any, blocklist: list[str], code: int, reason: str) -> None:
    decision = decide(RUNNING, candidate, blocklist)
    assert (decision.code, decision.take) == (code, code == OK)
    assert reason in decision.reason


@pytest.mark.parametrize("development", [True, False, None])
def test_development_device_takes_either(development: bool | None) -> None:
    """Finding 4: a development device may take a development or a production image."""
    running = Release(cls="c", compatible="kiln,c", version="2.0.0", development=True)
    assert decide(running, cand(development=development)).code == OK


def test_below_running_min_version_is_refused() -> None:
    running = Release(cls="c", compatible="kiln,c", version="1.0.0", min_version="3.0.0")
    assert decide(running, cand(version="2.0.0")).code == NOT_NEWER


def test_versions_of_any_length_order_totally() -> None:
    """Finding 3: no int() on a version part (Python refuses > 4300 digits); numbers still order as numbers.
    Such versions are outside the grammar: only a running image of the old grammar can have one, and
    it is ordered as systemd-boot orders its entry."""
    huge = "1" * 5000
    assert compare_versions(huge, "9" * 4999) == 1 and compare_versions(huge, "0" + huge) == 0
    assert compare_versions(f"1.{huge}", f"1.{huge[:-1]}2") == -1
    assert compare_versions("1.²", "1.0") == -1  # a non-ASCII digit is no version character for systemd
    values = ["1.0", "1.0.0-rc.1", huge, "1.a", "1.10", "1.9", "1.0+x", "0"]
    assert sorted(values, key=version_key) == sorted(sorted(values, key=version_key), key=version_key)


HOSTILE = [
    ({LABEL_VERSION: "1" * 5000}, "org.opencontainers.image.version='11111"),
    ({LABEL_VERSION: "2.1.0\ninit=/bin/sh"}, "malformed label org.opencontainers.image.version"),
    ({LABEL_VERSION: "../../etc/passwd"}, "malformed label org.opencontainers.image.version"),
    ({LABEL_VERSION: "2.1.²"}, "malformed label org.opencontainers.image.version"),
    ({LABEL_MIN_VERSION: "9" * 5000}, "malformed label dev.kiln.min-version"),
    ({LABEL_COMPATIBLE: "kiln,c\x00"}, "malformed label dev.kiln.compatible"),
    ({LABEL_COMPATIBLE: "kiln," + "c" * 200}, "malformed label dev.kiln.compatible"),
    ({LABEL_CLASS: "c/../../x"}, "malformed label dev.kiln.class"),
    ({LABEL_DEVELOPMENT: "yes"}, "malformed label dev.kiln.development"),
]


@pytest.mark.parametrize(("labels", "message"), HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
def test_hostile_labels_are_refused_by_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], labels: dict[str, str],
                                             message: str) -> None:
    """Finding 3: unverified labels from the registry go through `kiln-agent check` and are refused
    with exit 12 and a message naming the label, never a traceback (a 5,000-digit version once hit
    Python's int conversion limit)."""
    from kiln_device.agent import cli, oci

    good = {LABEL_VERSION: "2.1.0", LABEL_COMPATIBLE: "kiln,c", LABEL_CLASS: "c"}
    inspect = json.dumps({"Digest": "sha256:" + "d" * 64, "Labels": {**good, **labels}})
    monkeypatch.setattr(oci, "skopeo", lambda *a, **k: inspect)
    monkeypatch.setenv("KILN_AGENT_ROOT", str(tmp_path))  # no agent.json of this machine's
    code = cli.main(["--config", str(agent_config(tmp_path)), "check"])
    err = capsys.readouterr().err
    assert code == BAD_IMAGE, err
    assert message in err and "Traceback" not in err and len(err) < 1000


def agent_config(tmp_path: Path) -> Path:
    """A device's agent.json and running release.json in tmp_path, for cli.main."""
    (tmp_path / "policy.json").write_text("{}")
    (tmp_path / "release.json").write_text(json.dumps({"class": "c", "compatible": "kiln,c", "version": "2.0.0"}))
    (tmp_path / "cmdline").write_text("kiln.slot=a\n")
    (tmp_path / "boot_id").write_text("boot-1\n")
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"registry": "r:5000", "lookaside": "http://l", "policy": str(tmp_path / "policy.json"),
                                "release": str(tmp_path / "release.json"), "stateDir": str(tmp_path / "state"),
                                "esp": str(tmp_path / "esp"), "cmdline": str(tmp_path / "cmdline"),
                                "bootId": str(tmp_path / "boot_id")}))
    return path


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
    from builder.disk.assemble import finalize_entry

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


def kernel_phase_state(tmp_path: Path, boot_id: str | None = "boot-1") -> Any:
    state = installed_state(tmp_path)
    state.data["pending"].update(phase="kernel", bootTries=3)
    state.data["pending"].pop("bootId")
    if boot_id:
        state.data["pending"]["bootId"] = boot_id
    state.save()
    return state


def test_unjournaled_trial_entry_that_failed_is_a_rollback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 2: the power went out between writing the trial entry and journaling it; the trial
    boots failed and the device fell back. That is a rollback (blocklisted), not an interrupted update."""
    monkeypatch.setattr(reconcile, "failed_boot_reason", lambda installed_in=None: "health check failed")
    state = kernel_phase_state(tmp_path)
    boot = FakeBoot("a", ["kiln-2.0.0-a.conf", "kiln-2.1.0-b+0-3.conf"])
    out = cmd_boot(config(tmp_path, "boot-2"), RUNNING, state, boot)
    assert "did not stick" in out
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["lastResult"]["result"] == "rolled-back" and saved["pending"] is None
    assert {"2.1.0", "sha256:" + "c" * 64} <= set(saved["blocklist"])
    assert boot.names == ["kiln-2.0.0-a.conf"]


def test_unjournaled_trial_entry_on_the_same_boot_waits_for_the_reboot(tmp_path: Path) -> None:
    """Finding 2: on the boot that installed it, the found entry is journaled (phase entry, its name)."""
    state = kernel_phase_state(tmp_path)
    out = cmd_boot(config(tmp_path, "boot-1"), RUNNING, state, FakeBoot("a", ["kiln-2.1.0-b+3.conf"]))
    assert "next reboot" in out
    assert state.pending["phase"] == "entry" and state.pending["entry"] == "kiln-2.1.0-b+3.conf"


def test_kernel_phase_without_an_entry_or_boot_id_resumes(tmp_path: Path) -> None:
    """Finding 2: no entry on the ESP, or a journal without the installing boot id: the update resumes."""
    for state, names in ((kernel_phase_state(tmp_path), []),
                         (kernel_phase_state(tmp_path, None), ["kiln-2.1.0-b+3.conf"])):
        out = cmd_boot(config(tmp_path, "boot-2"), RUNNING, state, FakeBoot("a", names))
        assert "interrupted after kernel" in out and state.pending["phase"] == "kernel"


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


# --- the build side's trust files (builder.release.signing), rendered without gpg -----------------------


def test_policy_requires_the_release_key_for_every_docker_image() -> None:
    from builder.keys.device_files import render_policy, signed_identity

    policy = json.loads(render_policy("qemu-x86_64"))
    assert policy["default"] == [{"type": "reject"}]
    (rule,) = policy["transports"]["docker"][""]
    assert rule["type"] == "signedBy" and rule["keyPath"] == "/usr/lib/kiln/release-key.asc"
    assert rule["signedIdentity"] == {"type": "exactRepository", "dockerRepository": signed_identity("qemu-x86_64")}


def test_registries_d_and_lookaside_layout() -> None:
    from builder.keys.device_files import render_registries_d
    from builder.release.signing import signature_path

    text = render_registries_d("http://10.0.2.2:8000", scope="10.0.2.2:5000", staging="file:///s")
    assert 'docker:\n  "10.0.2.2:5000":\n    lookaside: "http://10.0.2.2:8000"\n    lookaside-staging: "file:///s"' \
        in text
    assert "default-docker:\n  lookaside: " in render_registries_d("http://x")
    assert signature_path(Path("/s"), "kiln/c", "sha256:" + "a" * 64) == \
        Path("/s/kiln/c@sha256=" + "a" * 64 + "/signature-1")


def test_signing_keys_stay_out_of_the_project() -> None:
    from builder.core.errors import UsageError
    from builder.keys.release_key import make_signing_key

    with pytest.raises(UsageError, match="inside the project"):
        make_signing_key(ROOT / "keys")


def test_an_unchanged_kernel_on_the_esp_is_kept_not_written_again(tmp_path: Path) -> None:
    """Most updates keep the kernel and initramfs: the slot's copies on the ESP stay (same inode, same
    bytes) instead of 20 MB written to FAT on every update; a changed one is replaced."""
    boot = SystemdBoot(config(tmp_path))
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initramfs.img"
    kernel.write_bytes(b"k" * 70_000)
    initrd.write_bytes(b"i" * 50_000)
    first = boot.install_kernel("b", kernel, initrd)
    dest = tmp_path / "esp/kiln/b"
    inodes = {n: (dest / n).stat().st_ino for n in ("vmlinuz", "initramfs.img")}
    initrd.write_bytes(b"j" * 50_000)
    second = boot.install_kernel("b", kernel, initrd)
    assert second["vmlinuz"] == first["vmlinuz"] and (dest / "vmlinuz").stat().st_ino == inodes["vmlinuz"]
    assert (dest / "initramfs.img").stat().st_ino != inodes["initramfs.img"]
    assert (dest / "initramfs.img").read_bytes() == b"j" * 50_000
    assert second["initramfs.img"] == hashlib.sha256(b"j" * 50_000).hexdigest()
