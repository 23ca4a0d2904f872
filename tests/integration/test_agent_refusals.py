"""The real agent refusing bad releases before it writes anything, and settling a trial entry
that a power cut left unjournaled (tests/ota.py FakeDevice, a real registry and signed images)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiln_device import contract
from tests.ota import FakeDevice, Services, make_oci_image, ota_services, publish, release_files, release_labels

pytestmark = pytest.mark.integration

BASE = {"usr/share/base/os.bin": b"base layer shared by every version\n" * 4096}
FALLBACK_TRUST = {"version": "0.9.0", "digest": "sha256:" + "9" * 64, "sha256": "0" * 64, "size": 4096,
                  "verified": "2026-01-01T00:00:00Z"}


@dataclass
class World(Services):
    layout: Path
    tmp: Path

    def release(self, version: str, channel: str, *, files: dict[str, bytes] | None = None,
                labels: dict[str, str] | None = None) -> str:
        make_oci_image(self.layout, version, files or release_files(version=version),
                       labels or release_labels(version=version), base=BASE)
        return publish(self.registry, "kiln/tiny", self.layout, version, key=self.key, lookaside=self.lookaside,
                       cls="tiny", tags=(version, channel), state=self.state)

    def device(self, name: str, channel: str) -> FakeDevice:
        dev = FakeDevice.create(self.tmp / name, registry=self.registry, lookaside=self.lookaside_url, key=self.key)
        path = contract.under(dev.root, contract.AGENT_JSON)
        config = json.loads(path.read_text())
        config["channel"] = channel
        path.write_text(json.dumps(config))
        return dev

    def layers_fetched_since(self, mark: int) -> set[str]:
        log = self.registry_log.read_text()[mark:]
        return set(re.findall(r'"GET /v2/kiln/tiny/blobs/(sha256:[0-9a-f]{64})', log))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("ota-refusals")
    with ota_services(tmp) as s:
        yield World(s.registry, s.registry_log, s.lookaside, s.lookaside_url, s.key, s.state, tmp / "oci", tmp)


def with_fallback(dev: FakeDevice) -> None:
    """Slot b holds the previous release, trusted and bootable: the device's way back."""
    (dev.entries / "kiln-0.9.0-b.conf").write_text("title fallback\nversion 0.9.0\noptions kiln.slot=b\n")
    dev.state_file.parent.mkdir(parents=True, exist_ok=True)
    dev.state_file.write_text(json.dumps({"schema": 1, "pending": None, "slots": {"b": FALLBACK_TRUST},
                                          "lastResult": None, "rollbacks": [], "blocklist": []}))


def bad_files(what: str, version: str) -> dict[str, bytes]:
    if what == "release-json-disagrees":
        return release_files(version=version + ".1")  # labels say `version`, release.json another
    if what == "development-disagrees":
        return release_files(version=version, development=True)  # labelled production
    files = release_files(version=version)
    if what == "no-kernel":
        del files[f"usr/lib/modules/{'6.1.0-test-amd64'}/vmlinuz"]
        return files
    kargs: Any = {"kargs-not-a-list": "console=ttyS0 panic=10",
                  "kargs-newline": ["console=ttyS0", "panic=10\ninit=/bin/sh"],
                  "kargs-choose-slot": ["console=ttyS0", "kiln.slot=a"]}[what]
    return release_files(version=version, kernel_args=kargs)


BAD = ["release-json-disagrees", "development-disagrees", "no-kernel", "kargs-not-a-list", "kargs-newline",
       "kargs-choose-slot"]


@pytest.mark.parametrize("what", BAD)
def test_bad_release_is_refused_before_anything_is_written_and_blocklisted(world: World, what: str) -> None:
    """Finding 1: refusals the image's content causes (release.json disagreeing with the labels, no
    kernel, bad kernel arguments) come before the fallback slot is invalidated, exit 12 (not a success
    status of kiln-agent.service), are recorded as failed and blocklist the digest: the next run says
    blocklisted without downloading or unpacking again."""
    version = f"10.{BAD.index(what)}.0"
    channel = f"ch-bad-{what}"
    labels = release_labels(version=version, development=False if what == "development-disagrees" else None)
    digest = world.release(version, channel, files=bad_files(what, version), labels=labels)
    dev = world.device(f"bad-{what}", channel)
    with_fallback(dev)
    entries = sorted(p.name for p in dev.entries.iterdir())
    slots = {s: dev.slot(s).read_bytes() for s in "ab"}
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == contract.BAD_IMAGE, proc.stderr
    assert "Traceback" not in proc.stderr and "blocklisted on this device" in proc.stderr
    state = dev.state()
    assert state["slots"]["b"] == FALLBACK_TRUST  # the way back is still trusted
    assert sorted(p.name for p in dev.entries.iterdir()) == entries
    assert {s: dev.slot(s).read_bytes() for s in "ab"} == slots
    assert not (dev.esp / "kiln").exists()
    assert "journal: invalidated" not in proc.stderr
    assert state["pending"] is None and digest in state["blocklist"]
    last = state["lastResult"]
    assert (last["result"], last["code"], last["digest"]) == ("failed", contract.BAD_IMAGE, digest)
    assert not (dev.root / "var/lib/kiln/work/rootfs").exists()
    # The next run: blocklisted at once, no layer downloaded, nothing unpacked.
    mark = world.registry_log.stat().st_size
    again = dev.agent("update", "--no-reboot")
    assert again.returncode == contract.BLOCKLISTED, again.stderr
    assert "failed on this device before" in again.stderr
    assert "unpacking" not in again.stderr and "journal:" not in again.stderr
    index = json.loads((dev.root / "var/lib/kiln/oci/index.json").read_text())
    manifest = json.loads((dev.root / "var/lib/kiln/oci/blobs/sha256" / index["manifests"][-1]["digest"][7:])
                          .read_text())
    assert world.layers_fetched_since(mark) <= {manifest["config"]["digest"]}  # `check` reads the labels only


@pytest.mark.parametrize("labelled", [True, False])
def test_production_device_refuses_a_development_image(world: World, labelled: bool) -> None:
    """Finding 4: a development image (dev.kiln.development=true, or only its signed release.json
    says so) is refused on a production device with exit 3; nothing is written."""
    version = f"12.{int(labelled)}.0"
    channel = f"ch-dev-{labelled}"
    world.release(version, channel, files=release_files(version=version, development=True),
                  labels=release_labels(version=version, development=True if labelled else None))
    dev = world.device(f"dev-image-{labelled}", channel)
    with_fallback(dev)
    if labelled:
        check = dev.agent("check")
        assert check.returncode == contract.INCOMPATIBLE, check.stderr
        assert "development image" in check.stdout
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == contract.INCOMPATIBLE, proc.stderr
    assert "development image" in proc.stderr
    assert dev.state()["slots"]["b"] == FALLBACK_TRUST
    assert "kiln-0.9.0-b.conf" in {p.name for p in dev.entries.iterdir()}
    assert not (dev.esp / "kiln").exists()


def test_development_device_takes_a_development_image(world: World) -> None:
    """Finding 4: a development device may take a development image."""
    world.release("13.0.0", "ch-dev-ok", files=release_files(version="13.0.0", development=True),
                  labels=release_labels(version="13.0.0", development=True))
    dev = world.device("dev-device", "ch-dev-ok")
    release = contract.under(dev.root, contract.RELEASE_JSON)
    release.write_text(json.dumps({**json.loads(release.read_text()), "development": True}))
    proc = dev.agent("update", "--no-reboot")
    assert proc.returncode == contract.OK, proc.stderr
    assert (dev.entries / "kiln-13.0.0-b+3.conf").is_file()


@pytest.mark.parametrize("after", ["reboot", "same-boot"])
def test_power_cut_between_entry_and_journal(world: World, after: str) -> None:
    """Finding 2: the power goes out after the trial entry is written, before it is journaled. The
    entry is on the ESP, so the next boots are the trial; when they fail and the device falls back,
    `boot` records a rollback and blocklists the release instead of reinstalling it. On the same
    boot, `update` finds the entry and waits for the reboot without installing again."""
    version = f"11.{int(after == 'same-boot')}.0"
    channel = f"ch-entry-{after}"
    digest = world.release(version, channel)
    dev = world.device(f"entry-{after}", channel)
    cut = dev.agent("update", "--no-reboot", env={"KILN_AGENT_FAULT": "after:entry-written"})
    assert cut.returncode == 137, cut.stderr
    assert dev.state()["pending"]["phase"] == "kernel"
    entry = dev.entries / f"kiln-{version}-b+3.conf"
    assert entry.is_file()
    if after == "same-boot":
        proc = dev.agent("update", "--no-reboot")
        assert proc.returncode == 0, proc.stderr
        assert "waits for a reboot" in proc.stderr and "unpacking" not in proc.stderr
        assert dev.state()["pending"]["phase"] == "entry"
    # The trials failed: systemd-boot used up the tries and booted slot a again.
    entry.rename(dev.entries / f"kiln-{version}-b+0-3.conf")
    dev.boot("a", "kiln-1.0.0-a.conf")
    proc = dev.agent("boot")
    assert proc.returncode == 0, proc.stderr
    state = dev.state()
    assert state["lastResult"]["result"] == "rolled-back", proc.stderr
    assert state["rollbacks"][-1]["version"] == version
    assert {version, digest} <= set(state["blocklist"])
    assert sorted(p.name for p in dev.entries.iterdir()) == ["kiln-1.0.0-a.conf"]
    again = dev.agent("update", "--no-reboot")
    assert again.returncode == contract.BLOCKLISTED, again.stderr
