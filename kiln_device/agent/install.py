"""check and update: decide on the channel's release, then install it into the inactive slot,
one journaled phase at a time (an interrupted run resumes or starts over)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from pathlib import Path

from kiln_device.agent import trust
from kiln_device.agent.bootctl import BootControl
from kiln_device.agent.config import Config, in_window, read_boot_id, require_registry
from kiln_device.agent.identity import device_id_of
from kiln_device.agent.journal import State, blocklist, fault_point, now
from kiln_device.agent.oci import fetch, inspect_channel, inspect_ref
from kiln_device.agent.slot import NewRoot, Paths, build_erofs, check_tree, unpack, work_paths, write_slot
from kiln_device.agent.versions import Candidate, Decision, candidate_from_labels, compare_versions, decide
from kiln_device.common import sha256_file
from kiln_device.contract import (
    BAD_IMAGE,
    BOOT_DIR,
    BOOT_UKI,
    CONFIG,
    EROFS_COMPRESSORS,
    INCOMPATIBLE,
    INTERNAL,
    LABEL_BOOT,
    LABEL_ROOT_LAYERS,
    LAYERS_KARG,
    NO_SPACE,
    OK,
    SIGNATURE,
    STALE,
    UP_TO_DATE,
    WAITING,
    WRITE_FAILED,
    Release,
    entry_text,
    layers_digest,
    oci_ref_name,
    other_slot,
    read_cmdline_slot,
    read_cmdline_value,
    uki_image_name,
)
from kiln_device.errors import AgentError, log
from kiln_device.layers import (
    LAYERS_FILE,
    Layer,
    drop_partial_layers,
    extract,
    fill_store,
    gc_store,
    image_layers,
    manifest_text,
    mounted_stack,
    parse_manifest,
    release_mounts,
    remove_tree,
)
from kiln_device.oci_layout import gc_layout, verified_labels
from kiln_device.pe import PEError, text_section
from kiln_device.tools import run


def cmd_check(
    config: Config, release: Release, state: State, *, read_labels: bool = True
) -> tuple[Decision, Candidate]:
    """The decision on what the channel offers. `read_labels=False` (update, with a TUF root): decide
    on the signed metadata alone, without reading the image's manifest and config from the registry;
    `update` then fetches them once and decides again on the verified labels (check_image)."""
    require_registry(config)
    cand = trusted_candidate(config, release, state, read_labels=read_labels) if trust.enabled(config) \
        else inspect_channel(config)
    decision = decide(release, cand, blocklist(state))
    return decision, cand


def trusted_candidate(config: Config, release: Release, state: State, *, read_labels: bool = True) -> Candidate:
    """The release fresh, verified TUF metadata names for this class and channel, read by digest
    (`read_labels`: its labels from the registry, as `check` shows them; otherwise what the signed
    metadata says, and the labels are checked once the image is fetched). The channel's state
    (fresh or stale, and whether the running release was withdrawn) is kept for `status`, on a
    refusal too."""
    try:
        channel = trust.read_channel(config, release)
    except AgentError as exc:
        previous = state.data.get("trust") or {}
        stale_since = previous.get("staleSince") if previous.get("status") == "stale" else None
        status = "stale" if exc.code == STALE else "unverified"
        state.data["trust"] = {**previous, "status": status, "checked": now(), "reason": exc.message,
                                 "staleSince": (stale_since or now()) if exc.code == STALE else None}
        state.save()
        if previous.get("status") != status and exc.code in (STALE, SIGNATURE):
            state.event("channel.stale", status=status, code=exc.code, reason=exc.message)
        raise
    running = channel.find(release.version)
    withdrawn = running.withdrawn if running else None
    if withdrawn:
        log(f"the running release {release.version} was withdrawn ({withdrawn.get('reason')}): "
            "moving on to the newest release of the channel that is not")
    device = device_id_of(config.identity_dir, config.fleet.identity) if channel.rollout else None
    chosen, waiting = trust.choose(channel, release, device)
    previous = state.data.get("trust") or {}
    state.data["trust"] = {"status": "fresh", "checked": now(), "expires": channel.expires,
                             "rootVersion": channel.root_version,
                             "newest": chosen.version if chosen else None,
                             "runningWithdrawn": withdrawn, "waiting": waiting}
    state.save()
    if previous.get("status") in ("stale", "unverified"):
        state.event("channel.fresh", reason=f"fresh metadata verified again (was {previous['status']})")
    if waiting and previous.get("waiting") != waiting:
        state.event("rollout.waiting", version=channel.newest(release.compatible).version,  # type: ignore[union-attr]
                    reason=waiting)
    if chosen is None or (waiting and compare_versions(chosen.version, release.version) <= 0):
        raise AgentError(WAITING, f"not updating yet: {waiting}")
    if not read_labels:  # one download of the manifest and config, by the copy (issue 18)
        return Candidate(version=chosen.version, compatible=chosen.compatible, digest=chosen.digest,
                         min_version=chosen.min_version, from_channel=True)
    cand = inspect_ref(config, f"{config.source}@{chosen.digest}")
    if (cand.version, cand.compatible, cand.digest) != (chosen.version, chosen.compatible, chosen.digest):
        raise AgentError(BAD_IMAGE, f"image {chosen.digest[:19]} says {cand.version} for {cand.compatible}; the "
                                    f"signed channel says {chosen.version} for {chosen.compatible}", blocklist=True)
    return cand


def cmd_update(config: Config, release: Release, state: State, boot: BootControl, *, reboot: bool) -> int:
    require_registry(config)
    booted = boot.booted_slot()
    if booted is None:
        raise AgentError(CONFIG, f"cannot tell the booted slot: no kiln.slot= in {config.cmdline}")
    target = other_slot(booted)
    decision, cand = cmd_check(config, release, state, read_labels=False)
    pending = state.pending
    if pending and pending.get("phase") == "entry" and pending.get("digest") == cand.digest:
        log(f"{cand.version} is installed in slot {pending['slot']} and waits for a reboot")
        return finish_install(config, state, reboot)
    if decision.code == UP_TO_DATE:
        log(f"up to date: {decision.reason}")
        return UP_TO_DATE
    if not decision.take:
        raise AgentError(decision.code, f"not updating: {decision.reason}")
    on_trial = trial_entry(boot, booted, release.version)
    if on_trial is not None:
        # Slot `target` holds the release this trial falls back to: writing it now would leave no good slot.
        raise AgentError(WAITING, f"not updating to {cand.version} yet: this boot is the trial of "
                                  f"{release.version} in slot {booted} ({on_trial}), not blessed; slot {target} "
                                  "holds the release it falls back to. The update waits until this slot is "
                                  "blessed or rolled back")
    if pending and (pending.get("digest") != cand.digest or pending.get("slot") != target):
        log(f"dropping the interrupted update to {pending.get('version')} (slot {pending.get('slot')}, "
            f"phase {pending.get('phase')}): the channel now has {cand.version}")
        pending = None
    if pending:
        log(f"resuming the update to {cand.version} after phase {pending.get('phase')}")
    else:
        started = now()
        state.event("update.started", key=f"{cand.digest}/{started}/started", version=cand.version,
                    digest=cand.digest, slot=target, previous=release.version)
        state.data["pending"] = {"version": cand.version, "digest": cand.digest, "slot": target,
                                 "from": release.version, "fromSlot": booted, "started": started,
                                 "phase": "started", "phases": {}}
        state.save()
    minute = time.gmtime().tm_hour * 60 + time.gmtime().tm_min
    try:
        if not in_window(config.window, minute):  # download-only: fetch now, apply inside the window
            fetch(config, cand, work_paths(config).layout)
            if not state.phase_done("fetched"):
                state.journal("fetched")
                state.event("update.downloaded", key=f"{cand.digest}/{(state.pending or {}).get('started')}/dl",
                            version=cand.version, window=config.raw.get("window"))
            log(f"downloaded {cand.version}; it is installed inside the maintenance window "
                f"{config.raw.get('window')} (UTC)")
            return WAITING
        install(config, release, state, boot, cand, target)
    except OSError as exc:
        error = AgentError(NO_SPACE if exc.errno == errno.ENOSPC else WRITE_FAILED, f"installing {cand.version}: {exc}")
        failed(config, state, cand, error)
        raise error from None
    except AgentError as exc:
        failed(config, state, cand, exc)
        raise
    finally:  # the image's setuid files and device nodes are never left lying in the work directory
        shutil.rmtree(work_paths(config).tree, ignore_errors=True)
    return finish_install(config, state, reboot)


def trial_entry(boot: BootControl, slot: str, version: str) -> str | None:
    """The boot entry of the running release when it is still on trial (boot counting, not blessed), else None."""
    entry = next((e for e in boot.entries() if e.slot == slot and e.version == version), None)
    return entry.name if entry is not None and not entry.blessed else None


def install(config: Config, release: Release, state: State, boot: BootControl, cand: Candidate,
            slot: str) -> None:
    paths = work_paths(config)
    device = config.slots[slot]
    # 1. Pull and verify, on a resumed run too (skopeo's index.json may not have survived a power
    # cut; a copy fetches only what is missing and the blobs are hashed again).
    fetch(config, cand, paths.layout)
    if not state.phase_done("fetched"):
        state.journal("fetched")
    # 2. Everything the image's content can refuse, before anything is written (again on every
    # resumed run): from here on the verified image names everything. An image made of layers is
    # checked as the layers the device will boot, mounted (they stay mounted until the entry is written).
    release_mounts(config.work_dir / "mnt")  # what a killed run left mounted
    with contextlib.ExitStack() as mounts:
        verified, tree, new, layers, uki = check_image(config, release, state, cand, paths, mounts, slot)
        write_new_slot(config, state, boot, slot, device, paths, verified, tree, new, layers, uki)
    ref = oci_ref_name(verified.version)
    # Space: the unpacked tree and the erofs image go; the layout keeps the running and new images,
    # the layer store the layers of the running and the new slot.
    shutil.rmtree(paths.tree, ignore_errors=True)
    remove_tree(boot_tree(config))
    paths.image.unlink(missing_ok=True)
    gc_layout(paths.layout, [oci_ref_name(release.version), ref])
    freed = gc_store(config.layers_dir, [*(la.diff_id for la in layers or ()), *running_layers(config, state)])
    if freed:
        log(f"removed {freed / 2**20:.1f} MiB of layers neither slot uses")


def write_new_slot(config: Config, state: State, boot: BootControl, slot: str, device: Path, paths: Paths,
                   verified: Candidate, tree: Path, new: NewRoot, layers: list[Layer] | None,
                   uki: Path | None = None) -> None:
    # 3. Stop trusting the target slot before touching it: no entry may point at it.
    if not state.phase_done("invalidated"):
        state.set_trust(slot, None)
        removed = boot.remove_slot_entries(slot)
        state.journal("invalidated", removedEntries=removed)
    # 4. Build the filesystem (redone on resume unless its image survived with the same hash).
    pending = state.pending or {}
    image_ok = layers is None and state.phase_done("built") and paths.image.exists() and \
        sha256_file(paths.image) == pending.get("imageSha256")  # a layer list (a few KiB) is always made again
    if not image_ok:
        if layers is None:
            sha = build_erofs(tree, paths.image, new.compressor, config.timeouts.build)
        else:  # the slot holds only the list of its layers
            sha = build_erofs(manifest_tree(paths, layers), paths.image, None, config.timeouts.build)
        state.journal("built", imageSha256=sha, imageSize=paths.image.stat().st_size,
                      bootTries=new.release.boot_tries)
    # 5. Write the slot and read it back.
    if not (state.phase_done("verified") and (state.trust(slot) or {}).get("digest") == verified.digest):
        size = write_slot(paths.image, device)
        state.journal("written")
        readback = sha256_file(device, size)
        expected = (state.pending or {})["imageSha256"]
        if readback != expected:
            raise AgentError(WRITE_FAILED, f"slot {slot} ({device}) reads back {readback[:16]}, "
                                           f"wrote {expected[:16]}: the medium is failing")
        state.set_trust(slot, {"version": verified.version, "digest": verified.digest, "sha256": readback,
                               "size": size, "verified": now(),
                               "layers": [la.diff_id for la in layers] if layers is not None else None})
        state.journal("verified")
    # 6. Kernel and initramfs, from the tree this run unpacked and checked (never a leftover); with
    # verified boot, the slot's signed UKI, staged under a name the loader does not list. The boot id
    # goes in now: a trial entry found after a power cut is then settled like a journaled one.
    hashes = boot.install_kernel(slot, new.kernel, new.initrd) if uki is None else {"uki": boot.stage_uki(slot, uki)}
    state.journal("kernel", kernel=hashes, bootId=read_boot_id(config))
    # 7. The trial entry, last: before it exists nothing boots the new slot.
    trust = state.trust(slot) or {}
    if trust.get("digest") != verified.digest or sha256_file(device, trust["size"]) != trust["sha256"]:
        raise AgentError(WRITE_FAILED, f"slot {slot} no longer matches its verification record")
    if uki is None:
        name = boot.add_trial_entry(cls=new.release.cls, version=verified.version, slot=slot,
                                    tries=new.release.boot_tries, kargs=new.kargs)
    else:
        name = boot.add_trial_uki(version=verified.version, slot=slot, tries=new.release.boot_tries)
    fault_point("entry-written")
    state.journal("entry", entry=name, bootId=read_boot_id(config))


def manifest_tree(paths: Paths, layers: list[Layer]) -> Path:
    """The directory the slot's small erofs is made from: /kiln-layers alone."""
    shutil.rmtree(paths.tree, ignore_errors=True)
    paths.tree.mkdir(parents=True)
    paths.tree.chmod(0o755)
    (paths.tree / LAYERS_FILE).write_text(manifest_text(layers))
    return paths.tree


def running_layers(config: Config, state: State) -> list[str]:
    """The layers the slots are made of: the running root's /kiln-layers, and what the agent recorded
    when it wrote each slot (either alone keeps them: the state may have been reset, the file absent)."""
    ids: list[str] = []
    with contextlib.suppress(OSError):
        ids += parse_manifest(config.running_layers.read_text())
    for slot_trust in (state.data.get("slots") or {}).values():
        if isinstance(slot_trust, dict):
            ids += [str(i) for i in slot_trust.get("layers") or []]
    return ids


def check_image(config: Config, release: Release, state: State, cand: Candidate, paths: Paths,
                mounts: contextlib.ExitStack, slot: str = "b",
                ) -> tuple[Candidate, Path, NewRoot, list[Layer] | None, Path | None]:
    """The signed image's labels decided on again, then its tree unpacked (or its layers built and
    mounted, on `mounts`) and checked against them; with verified boot, the UKI for `slot` taken from
    the boot layer and checked to bind the layers built here. A refusal the signed content causes is
    final for that digest (blocklisted by `failed`)."""
    try:
        labels = verified_labels(paths.layout, oci_ref_name(cand.version))
        verified = candidate_from_labels(labels, cand.digest)
        if (verified.version, verified.compatible) != (cand.version, cand.compatible) and cand.from_channel:
            raise AgentError(BAD_IMAGE, f"image {cand.digest[:19]} says {verified.version} for {verified.compatible}; "
                                        f"the signed channel says {cand.version} for {cand.compatible}",
                             blocklist=True)
        if (verified.version, verified.compatible) != (cand.version, cand.compatible):
            raise AgentError(SIGNATURE, f"the registry showed {cand.compatible} {cand.version} for {cand.digest[:19]}, "
                                        f"its signed image says {verified.compatible} {verified.version}")
        again = decide(release, verified, blocklist(state))
        if not again.take:  # the labels we decided on were not verified; these are
            raise AgentError(again.code, f"not updating (verified image): {again.reason}",
                             blocklist=again.code == INCOMPATIBLE)
        layered = layer_compression(labels)
        verified_boot = boot_kind(labels)
        if verified_boot and layered is None:
            raise AgentError(BAD_IMAGE, f"{verified.version} boots verified (signed UKIs) from layers, which this "
                                        "agent cannot make without root or without the image's "
                                        f"{LABEL_ROOT_LAYERS} label")
        if not verified_boot and booted_verified(config):
            raise AgentError(INCOMPATIBLE, f"this device boots verified (its command line binds its layers) and "
                                           f"{verified.version} has no signed UKIs: it would boot unverified",
                             blocklist=True)
        layers: list[Layer] | None = None
        uki: Path | None = None
        if layered is not None:
            layers = build_layers(config, paths, oci_ref_name(verified.version), layered, boot_layer=verified_boot)
            if verified_boot:
                uki = take_uki(config, paths, oci_ref_name(verified.version), slot, layers, verified.version)
            tree = mounts.enter_context(mounted_stack(config.layers_dir, layers, config.work_dir / "mnt"))
        else:
            tree = unpack(paths.layout, oci_ref_name(verified.version), paths.tree, config.timeouts.unpack)
        new = check_tree(tree, verified)
        if layered is not None and new.release.compression != layered:
            raise AgentError(BAD_IMAGE, f"the image's {LABEL_ROOT_LAYERS} label says {layered}, its "
                                        f"release.json's rootCompression {new.release.compression}")
        if new.release.development and not release.development:
            raise AgentError(INCOMPATIBLE, f"{verified.version} is a development image (its release.json) and this "
                                           f"device runs a production image ({release.version})", blocklist=True)
    except AgentError as exc:
        exc.blocklist = exc.blocklist or exc.code == BAD_IMAGE
        raise
    return verified, tree, new, layers, uki


def boot_kind(labels: dict[str, str]) -> bool:
    """Whether the image boots verified: its top layer holds a signed UKI per slot (LABEL_BOOT)."""
    value = labels.get(LABEL_BOOT)
    if value is None:
        return False
    if value != BOOT_UKI:
        raise AgentError(BAD_IMAGE, f"the image's {LABEL_BOOT} label is {str(value)[:40]!r}; this agent knows "
                                    f"{BOOT_UKI!r}")
    return True


def booted_verified(config: Config) -> bool:
    """Whether this boot's command line (signed, in a UKI) binds its layer list."""
    try:
        return read_cmdline_value(config.cmdline.read_text(), LAYERS_KARG) is not None
    except OSError:
        return False


def boot_tree(config: Config) -> Path:
    return config.work_dir / "boot"


def take_uki(config: Config, paths: Paths, ref: str, slot: str, layers: list[Layer], version: str) -> Path:
    """The slot's signed UKI from the image's boot layer (unpacked, its diff id checked), refused unless its
    command line boots `slot` and binds exactly the layers this device built. The firmware checks the
    signature at boot; what is checked here is that the slot will boot at all."""
    diff_id, blob = image_layers(paths.layout, ref)[-1]
    tree = boot_tree(config)
    remove_tree(tree)
    tree.mkdir(mode=0o700, parents=True)
    extract(blob, diff_id, tree, config.timeouts.unpack)
    uki = tree / BOOT_DIR.lstrip("/") / uki_image_name(slot)
    if uki.is_symlink() or not uki.is_file():
        raise AgentError(BAD_IMAGE, f"the boot layer of {version} has no {BOOT_DIR}/{uki_image_name(slot)}")
    try:
        cmdline = text_section(uki, ".cmdline") or ""
        osrel = text_section(uki, ".osrel") or ""
    except PEError as exc:
        raise AgentError(BAD_IMAGE, f"the UKI of slot {slot} in {version}: {exc}") from None
    if read_cmdline_slot(cmdline) != slot:
        raise AgentError(BAD_IMAGE, f"the UKI {uki_image_name(slot)} of {version} does not boot slot {slot}")
    want, got = read_cmdline_value(cmdline, LAYERS_KARG), layers_digest(manifest_text(layers))
    if want != got:
        raise AgentError(BAD_IMAGE, f"the UKI of slot {slot} in {version} binds layer list {want}, but the layers "
                                    f"this device made list to {got}: the slot would not boot")
    if f"IMAGE_VERSION={entry_text(version)}" not in osrel.splitlines():
        raise AgentError(BAD_IMAGE, f"the UKI of slot {slot} says it is not {version} (its .osrel)")
    return uki


def layer_compression(labels: dict[str, str]) -> str | None:
    """The compression of each layer's erofs when the image boots from layers (its label), else None:
    the image is written as one whole-root erofs. Layers need root (device nodes for whiteouts,
    overlayfs xattrs, loop mounts); without it the agent writes the whole root, which every image boots."""
    value = labels.get(LABEL_ROOT_LAYERS)
    if value is None:
        return None
    if not isinstance(value, str) or value not in EROFS_COMPRESSORS:
        raise AgentError(BAD_IMAGE, f"the image's {LABEL_ROOT_LAYERS} label is {str(value)[:40]!r}, not one of "
                                    f"{', '.join(EROFS_COMPRESSORS)}")
    if os.geteuid() != 0:
        log("not running as root: writing the whole root filesystem instead of its layers")
        return None
    return value


def build_layers(config: Config, paths: Paths, ref: str, compression: str, *, boot_layer: bool = False) -> list[Layer]:
    """Every layer of the image in the store (less the boot layer on top, which is not part of the root):
    the ones the device lacks built, the others reused."""
    wanted = image_layers(paths.layout, ref)
    out, built, written = fill_store(config.layers_dir, wanted[:-1] if boot_layer else wanted,
                                     EROFS_COMPRESSORS[compression], (config.timeouts.unpack, config.timeouts.build))
    log(f"layers: {built} built ({written / 2**20:.1f} MiB written), {len(out) - built} already on the device")
    return out


def failed(config: Config, state: State, cand: Candidate, exc: AgentError) -> None:
    """Record a failed update. Out of space, the unpacked tree and the erofs image go first
    (the device needs its data partition more than a half-done update; the downloaded blobs
    stay, so a retry fetches only what is missing) and the message says how much is free."""
    if exc.code == NO_SPACE:
        paths = work_paths(config)
        shutil.rmtree(paths.tree, ignore_errors=True)
        with contextlib.suppress(OSError):
            paths.image.unlink(missing_ok=True)
        drop_partial_layers(config.layers_dir)
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(config.work_dir if config.work_dir.exists() else config.state_dir).free
            exc.message += (f" ({config.work_dir} is on a full filesystem; {free / 2**20:.0f} MiB free after "
                            "removing the unpacked update; free space there and run `kiln-agent update` again)")
            exc.args = (exc.message,)
    if exc.blocklist:  # the signed image itself is refused: never again, and nothing of it kept
        if cand.digest not in state.data["blocklist"]:
            state.data["blocklist"].append(cand.digest)
        state.data["pending"] = None
        shutil.rmtree(work_paths(config).tree, ignore_errors=True)
        with contextlib.suppress(OSError):  # and the layers only it used
            gc_store(config.layers_dir, running_layers(config, state))
        exc.message += f" (refused for good: {cand.digest[:19]} is blocklisted on this device)"
        exc.args = (exc.message,)
    state.event("update.failed", version=cand.version, digest=cand.digest, code=exc.code, reason=exc.message,
                blocklisted=exc.blocklist)
    state.finish("failed", version=cand.version, digest=cand.digest, code=exc.code, reason=exc.message)


def finish_install(config: Config, state: State, reboot: bool) -> int:
    pending = state.pending or {}
    state.event("update.installed", key=f"{pending.get('digest')}/{pending.get('started')}/installed",
                version=pending.get("version"), slot=pending.get("slot"))
    state.finish("installed", version=pending.get("version"), slot=pending.get("slot"), entry=pending.get("entry"))
    log(f"installed {pending.get('version')} in slot {pending.get('slot')} as {pending.get('entry')}")
    if reboot:
        log("rebooting into it")
        run(list(config.reboot_command), what="rebooting", code=INTERNAL, capture=False)
    else:
        log("not rebooting (--no-reboot): the new slot boots on the next reboot")
    return OK
