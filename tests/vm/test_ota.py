"""End to end on one device: signed A/B updates from a registry, boot assessment, rollback.

One disk copy plays one device through a release history, as a device in the field
would live it (each step needs the previous one, so they run in order):

1. refusals: an image for another class, an older version, an unsigned image and one
   signed by another key are refused before anything is written (slot B unchanged);
2. v1 -> v2 (only the model changed): the agent updates, reboots into slot B, the
   entry is blessed, `status` shows v2, and the registry served only the changed blobs;
3. v3 whose golden inference fails: three trial boots, then systemd-boot falls back
   to v2 on its own; the agent records the rollback and never takes v3 again.
4. the fleet: the device reports to a real `kiln fleet serve` through a link the test cuts
   (tests/netfault.py) during the v2 update and during the v3 rollback, and the power is cut while
   its outbox holds what it could not send; once the link is back, every event of the device's
   life is in the service exactly once, in order. The device has a TPM (swtpm, `kiln vm run
   --tpm`): its key is made there on its first boot (ECDSA P-256, no key file), signs every
   report, and stays its identity across every boot, update, rollback and the power cut.

On a fresh copy of the disk: a release whose initramfs cannot start (the kernel panics,
panic=10 reboots): boot counting brings the device back to slot A without any userspace
help, and the agent says so.

Power cuts, a full data partition and a registry lost mid-download: test_ota_faults.py.

Tiers: 1 to 4 are in the vm tier (scripts/test, CI; 3 goes on from the device 2 left); the unbootable
initramfs is in the long vm tier (scripts/test-vmlong). Under TCG on a 2-core AMD EPYC a boot to healthy
takes about a minute; the model-only test takes about 2.5 minutes (19.5 before layered updates), the
golden-check rollback about 5 and the fleet's record of it 1.2.

Helpers (the registry as the guest sees it, derived images): tests/vm/otakit.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.projects import make_broken_golden_project, make_retrained_project
from builder.core import paths
from builder.core.run import run
from builder.disk import vm
from builder.fleet.store import open_store
from builder.keys.release_key import SigningKey, make_signing_key
from tests.fleet import FleetService, kiln, running_fleet
from tests.images import QEMU_CLASS
from tests.netfault import FaultyLink
from tests.ota import make_oci_image, publish, push_unsigned, release_files, release_labels
from tests.vm.conftest import BOOT_TIMEOUT, BuiltDisk, copy_disk
from tests.vm.otakit import (
    LIST_ENTRIES,
    REPO,
    Releases,
    agent,
    boot_until_healthy_on,
    configure,
    serving_releases,
    slot_digest,
    status,
    unbootable_initramfs,
)


@pytest.fixture(scope="module")
def releases(qemu_disk: BuiltDisk, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Releases]:
    with serving_releases(tmp_path_factory.mktemp("ota")) as rel:
        rel.release(qemu_disk.version)  # v1, what the disk runs, on the channel
        yield rel


@dataclass
class FleetLink:
    service: FleetService
    link: FaultyLink
    db: str
    token: Path

    def settings(self) -> dict[str, Any]:
        return {"fleet": {"url": f"https://10.0.2.2:{self.link.port}"}}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetLink]:
    """The fleet service the device reports to, reached through a link the tests cut and restore."""
    tmp = tmp_path_factory.mktemp("fleet")
    db = f"sqlite:///{tmp / 'fleet.db'}"
    with running_fleet(tmp, db, hosts=("127.0.0.1", "10.0.2.2")) as svc, \
            FaultyLink(svc.url.removeprefix("https://")) as link:
        kiln("fleet", "token", QEMU_CLASS, "--out", str(tmp / "token"), "--db", db, check=True)
        yield FleetLink(svc, link, db, tmp / "token")


def setup(machine: vm.VM, releases: Releases, fleet: FleetLink) -> None:
    """The registry, the fleet service, its CA and this device's enrollment token."""
    configure(machine, releases, extra=fleet.settings())
    ca, token = fleet.service.ca.read_text(), fleet.token.read_text().strip()
    machine.ssh(f"umask 077 && printf '%s\\n' '{token}' > /etc/kiln/enroll.token && "
                f"printf '%s' '{ca}' > /etc/kiln/fleet-ca.pem")


@pytest.fixture(scope="module")
def device(qemu_disk: BuiltDisk, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, vm.VMConfig]:
    """One device: its own disk copy and EFI variables for the whole module."""
    tmp = tmp_path_factory.mktemp("device")
    image = copy_disk(qemu_disk.path, tmp / "disk.raw")
    return image, vm.VMConfig(disk=image, ssh_key=qemu_disk.ssh_key, workdir=tmp / "vm", no_reboot=True, tpm=True)


def tiny(releases: Releases, tag: str, *, compatible: str = "kiln,qemu-x86_64", version: str = "9.0.0",
         key: SigningKey | None = None, signed: bool = True, listed: bool = True) -> None:
    """A small image under the class's repository at TAG (never the channel); named in the TUF channel TAG
    unless not `listed` (a tag the registry's owner moved, which no device reads)."""
    layout = releases.tmp / f"tiny-{tag}"
    files = release_files(cls=QEMU_CLASS, compatible=compatible, version=version)
    make_oci_image(layout, tag, files, release_labels(cls=QEMU_CLASS, compatible=compatible, version=version))
    if signed:
        digest = publish(releases.registry.address, REPO, layout, tag, key=key or releases.key,
                         lookaside=releases.signatures, cls=QEMU_CLASS, tags=[tag], state=releases.state)
    else:
        digest = push_unsigned(releases.registry.address, REPO, layout, tag, tag, releases.state)
    if listed:
        releases.name_in_channel(version, tag, digest, compatible)


def test_refusals_write_nothing(releases: Releases, device: tuple[Path, vm.VMConfig], fleet: FleetLink) -> None:
    other_key = make_signing_key(releases.tmp / "other-key", uid="Someone else <x@example.invalid>")
    tiny(releases, "wrong-class", compatible="acme,other-box")
    tiny(releases, "older", version="0.9.0")
    tiny(releases, "unsigned", signed=False)
    tiny(releases, "other-key", key=other_key)
    # Signed and tagged, never released: the tag is not read. Another version than the others, so it is
    # another digest (tiny images of the same version are the same bytes, and this one's signature would
    # sign "unsigned" too).
    tiny(releases, "unlisted", version="9.1.0", listed=False)
    _, cfg = device
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        # The device key, made by the TPM on the first boot: P-256 at the agent's persistent handle, no key file.
        ident = json.loads(machine.ssh("kiln-agent identity --json").stdout)
        assert (ident["keyType"], ident["store"], ident["handle"]) == ("ecdsa-p256", "tpm", "0x81000100"), ident
        assert "0x81000100" in machine.ssh("tpm2_getcap handles-persistent").stdout
        assert machine.ssh("ls /var/lib/kiln/identity").stdout.split() == ["id", "tpm.json"]
        setup(machine, releases, fleet)
        before = slot_digest(machine, "b")
        entries = machine.ssh(LIST_ENTRIES).stdout
        expected = {"wrong-class": (3, "compatible"), "older": (4, "older than the running"),
                    "unsigned": (6, "signature"), "other-key": (6, "signature"),
                    "unlisted": (3, "names no release")}
        for tag, (code, words) in expected.items():
            r = machine.ssh(f"echo '{{\"channel\": \"{tag}\"}}' > /tmp/ch.json && "
                            f"kiln-agent --config /tmp/ch.json update --no-reboot 2>&1", check=False, timeout=600)
            assert r.exit_status == code, (tag, r.stdout)
            assert words in r.stdout.lower(), (tag, r.stdout)
        # Tampered channel metadata (the timestamp a server in between rewrote): refused, nothing written.
        timestamp = releases.signatures / "tuf/metadata/timestamp.json"
        good = timestamp.read_bytes()
        timestamp.write_bytes(good.replace(b'"version":', b'"version": 1000000, "x":', 1))
        try:
            r = machine.ssh("kiln-agent update --no-reboot 2>&1", check=False, timeout=600)
        finally:
            timestamp.write_bytes(good)
        assert r.exit_status == 6 and "tuf metadata" in r.stdout.lower(), r.stdout
        assert slot_digest(machine, "b") == before
        assert machine.ssh(LIST_ENTRIES).stdout == entries
        # The link is up: the device enrolls (its report timer may have done so already, during the
        # refusals). A token alone makes no device whose reports count: it waits as pending, its events
        # kept, and the token it used is gone from the device.
        r = agent(machine, "report", "--now")
        assert r.exit_status == 14 and "kiln fleet accept" in r.stdout, r.stdout
        meta = json.loads(machine.ssh("cat /var/lib/kiln/agent/outbox/meta.json").stdout)
        assert meta["enrolled"] == fleet.settings()["fleet"]["url"] and meta["fleetState"] == "pending", meta
        assert machine.ssh("test -e /etc/kiln/enroll.token", check=False).exit_status == 1
        st = status(machine)["fleet"]
        assert st["state"] == "pending" and not st["tokenPresent"] and st["outbox"] > 0, st
        me = machine.ssh("kiln-agent identity").stdout.strip()
        listed = kiln("fleet", "devices", "--pending", "--json", "--db", fleet.db, check=True)
        [pending] = json.loads(listed.stdout)
        assert (pending["id"], pending["key_origin"], pending["key_type"]) == (me, "tpm", "ecdsa-p256"), pending
        assert not stored_events(fleet.db, me)  # nothing of a pending device is stored
        kiln("fleet", "accept", me, "--db", fleet.db, check=True)
        r = agent(machine, "report", "--now")  # accepted: it sends everything it kept
        assert r.exit_status == 0, r.stdout
        assert status(machine)["fleet"]["outbox"] == 0
        assert stored_events(fleet.db, me)
        machine.poweroff()


def stored_events(db: str, device: str) -> list[dict[str, object]]:
    store = open_store(db)
    try:
        return store.events(device)
    finally:
        store.close()


def test_model_only_update_boots_slot_b_and_is_blessed(releases: Releases, qemu_disk: BuiltDisk,
                                                       device: tuple[Path, vm.VMConfig], fleet: FleetLink) -> None:
    v1 = json.loads(paths.record_path(QEMU_CLASS, qemu_disk.version).read_text())
    project = make_retrained_project(releases.tmp / "v2-project")
    v2 = releases.release("1.0.1", project)
    changed = {b["diffId"] for a, b in zip(v1["layers"], v2["layers"], strict=True) if a["diffId"] != b["diffId"]}
    # model, release, and the boot layer: its signed UKIs bind the new layer list (verified boot)
    assert len(changed) == 3
    assert [rec["group"] for rec in v2["layers"] if rec["diffId"] in changed] == ["model", "release", "boot"]
    _, cfg = device
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        setup(machine, releases, fleet)
        assert agent(machine, "check").exit_status == 0
        fleet.link.cut()  # the fleet's link goes down for the update
        mark = releases.log_mark()
        # the agent reboots at the end: QEMU (-no-reboot) exits then
        machine.ssh("systemd-run --unit kiln-test-update --collect kiln-agent update")
        machine.wait_exit(900)
    fetched = releases.blobs_fetched_since(mark)
    pushed = v2["pushed"][-1]["digest"]
    manifest = json.loads(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                               f"docker://{releases.registry.address}/{REPO}@{pushed}"], capture=True).stdout)
    new_blobs = {manifest["config"]["digest"]} | {
        layer["digest"] for layer, rec in zip(manifest["layers"], v2["layers"], strict=True)
        if rec["diffId"] in changed}
    assert fetched == new_blobs, "the agent fetched more than the changed blobs"
    with vm.start_vm(cfg) as machine:
        machine.wait_for_healthy(BOOT_TIMEOUT)
        machine.wait_for_ssh(BOOT_TIMEOUT)
        machine.ssh("systemctl is-active --wait systemd-bless-boot.service || true", timeout=120)
        st = status(machine)
        assert (st["version"], st["bootedSlot"]) == ("1.0.1", "b")
        assert "kiln.slot=b" in machine.ssh("cat /proc/cmdline").stdout
        # Slot B holds only its layer list; the root is the image's layers from the data partition,
        # checked by fs-verity and stacked by the initramfs.
        # With verified boot, the list is the image's layers less its boot layer (the UKIs), and its digest is
        # in slot B's signed command line.
        listed = [line.split() for line in machine.ssh("cat /run/kiln/slot-layers").stdout.splitlines()]
        assert [diff for diff, _ in listed] == [rec["diffId"].removeprefix("sha256:") for rec in v2["layers"]
                                                if rec["group"] != "boot"]
        assert f"kiln.layers={v2['boot']['layers']}" in machine.ssh("cat /proc/cmdline").stdout.split()
        assert machine.ssh("findmnt -n -o FSTYPE /").stdout.strip() == "overlay"
        for diff, verity in listed:
            measured = machine.ssh(f"fsverity measure /run/kiln/data/layers/{diff}.erofs").stdout.split()[0]
            assert measured == verity, (diff, measured, verity)
        entries = machine.ssh("ls /efi/EFI/Linux").stdout.split()
        assert "kiln-1.0.1-b.efi" in entries, entries  # slot B's signed UKI, blessed: the +N counter is gone
        assert st["lastResult"]["result"] == "success", st
        r = agent(machine, "report")
        assert r.exit_status == 7 and "next attempt in" in r.stdout, r.stdout  # kept, backing off
        assert status(machine)["fleet"]["outbox"] > 0
        fleet.link.restore()  # the link is back: the device sends what it kept
        r = agent(machine, "report", "--now")
        assert r.exit_status == 0 and "Traceback" not in r.stdout, r.stdout
        assert status(machine)["fleet"]["outbox"] == 0
        machine.poweroff()


def test_failed_golden_check_rolls_back_and_blocklists(releases: Releases, device: tuple[Path, vm.VMConfig],
                                                       fleet: FleetLink) -> None:
    project = make_broken_golden_project(releases.tmp / "v3-project")
    releases.release("1.0.2", project)
    _, cfg = device
    fleet.link.cut()  # down again, for the whole rollback
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        assert status(machine)["version"] == "1.0.1"
        machine.ssh("systemd-run --unit kiln-test-update --collect kiln-agent update")
        machine.wait_exit(900)
    # Trial boots of v3 fail their health check and reboot (FailureAction=reboot on trial
    # boots); with its tries used up, systemd-boot picks the good v2 entry by itself.
    with boot_until_healthy_on(cfg, "b") as (machine, boots):
        assert [b.slot for b in boots] == ["a", "a", "a", "b"], boots  # three trials of v3, then v2
        assert all("reboot: Restarting system" in b.console for b in boots[:3])  # systemd rebooted each
        machine.wait_for_ssh(BOOT_TIMEOUT)
        st = status(machine)
        assert (st["version"], st["bootedSlot"]) == ("1.0.1", "b"), st
        assert [rb["version"] for rb in st["rollbacks"]] == ["1.0.2"], st
        assert "1.0.2" in st["blocklist"]
        assert agent(machine, "check").exit_status == 5  # never retried
        journal_boots = machine.ssh("journalctl --list-boots --no-pager | wc -l").stdout.strip()
        assert int(journal_boots) >= 5, journal_boots  # v2, three v3 trials, this one at least (a persistent journal)
        assert agent(machine, "report").exit_status == 7
        machine.kill()  # the power goes out with the rollback's events still in the outbox


def test_every_event_reaches_the_fleet_once_in_order(qemu_disk: BuiltDisk, device: tuple[Path, vm.VMConfig],
                                                     fleet: FleetLink) -> None:
    """After the power cut, the link comes back: the service has the device's whole life, each event once."""
    _, cfg = device
    fleet.link.restore()
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        # The boot's own record comes from kiln-agent-boot.service, which runs after the golden check:
        # report once it has, or its event lands in the outbox after the report.
        machine.ssh("timeout 600 sh -c 'until systemctl is-active -q kiln-agent-boot.service; do sleep 1; done'",
                    timeout=620)
        r = agent(machine, "report", "--now")
        assert r.exit_status == 0, r.stdout
        me = machine.ssh("kiln-agent identity").stdout.strip()
        meta = json.loads(machine.ssh("cat /var/lib/kiln/agent/outbox/meta.json").stdout)
        st = status(machine)
        machine.poweroff()
    assert st["fleet"]["outbox"] == 0 and st["fleet"]["dropped"] == 0, st["fleet"]
    store = open_store(fleet.db)
    try:
        events = store.events(me)
        enrolled = store.device_key(me)
    finally:
        store.close()
    assert enrolled is not None and enrolled[2] == "ecdsa-p256", enrolled  # the TPM's key signed every report
    assert [e["seq"] for e in events] == list(range(1, meta["lastSeq"] + 1))  # none lost, none twice, in order
    key = [(e["kind"], e.get("version")) for e in events if e.get("version") in ("1.0.1", "1.0.2")
           and e["kind"] in ("update.started", "update.installed", "update.success", "rollback")]
    refused = [e for e in events if e["kind"] == "update.failed"]  # the refusals that got as far as a fetch
    assert refused and all(e["code"] == 6 for e in refused), refused
    assert key == [("update.started", "1.0.1"), ("update.installed", "1.0.1"), ("update.success", "1.0.1"),
                   ("update.started", "1.0.2"), ("update.installed", "1.0.2"), ("rollback", "1.0.2")], key
    boots = [(e.get("version"), e.get("slot")) for e in events if e["kind"] == "boot"]
    assert boots[0] == (qemu_disk.version, "a") and boots[-1] == ("1.0.1", "b"), boots
    assert "golden" in next(e for e in events if e["kind"] == "rollback")["reason"]


@pytest.mark.vmlong
def test_unbootable_initramfs_falls_back_by_boot_counting(releases: Releases, qemu_disk: BuiltDisk,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fresh device (v1, slot A) takes a release whose initramfs cannot start: every trial boot
    panics (panic=10 reboots), and boot counting alone brings it back to slot A."""
    from tests.images import qemu_image

    v1 = qemu_image(releases.state)  # the base: only the initramfs and the version change
    releases.release_derived(v1["image"]["ref"], "1.0.3", "unbootable", initramfs=unbootable_initramfs())
    tmp = tmp_path_factory.mktemp("unbootable")
    image = copy_disk(qemu_disk.path, tmp / "disk.raw")
    cfg = vm.VMConfig(disk=image, ssh_key=qemu_disk.ssh_key, workdir=tmp / "vm", no_reboot=True)
    with vm.start_vm(cfg) as machine:
        machine.wait_for_ssh(BOOT_TIMEOUT)
        configure(machine, releases, channel="unbootable")
        good = slot_digest(machine, "a")
        machine.ssh("systemd-run --unit kiln-test-update --collect kiln-agent update")
        machine.wait_exit(900)
    with boot_until_healthy_on(cfg, "a") as (machine, boots):
        # each try of slot B panics before any userspace; then slot A, with no help from the agent
        assert [b.console.count("No working init found") for b in boots] == [1, 1, 1, 0], boots
        assert [b.slot for b in boots] == ["b", "b", "b", "a"], boots
        machine.wait_for_ssh(BOOT_TIMEOUT)
        st = status(machine)
        assert (st["version"], st["bootedSlot"]) == (qemu_disk.version, "a"), st
        assert [rb["version"] for rb in st["rollbacks"]] == ["1.0.3"], st
        assert "never got as far as writing a journal" in st["rollbacks"][-1]["reason"], st
        assert not [e for e in st["entries"] if e.startswith("kiln-1.0.3")], st  # removed after the fallback
        assert slot_digest(machine, "a") == good
        assert agent(machine, "check").exit_status == 5
        machine.poweroff()
