"""On-boot reconciliation (kiln-agent boot): settle the pending update with the slot we booted.

A trial boot of the slot we installed that got blessed is a success; a boot of the other
slot means the new one was rolled back: record why (from the journal), blocklist it."""

from __future__ import annotations

import json

from kiln_device import common
from kiln_device.agent.bootctl import BootControl
from kiln_device.agent.config import Config, read_boot_id
from kiln_device.agent.journal import MAX_ROLLBACKS, State, now
from kiln_device.contract import Release, entry_name
from kiln_device.errors import log

JOURNAL_TIMEOUT = 30
NO_TRIAL_JOURNAL = ("the new slot never got as far as writing a journal (its kernel or initramfs failed: "
                    "boot counting used up its tries)")


def journalctl(*args: str) -> common.Completed:
    """journalctl on the previous boot (-b -1), through common.run; raises common.CommandError."""
    return common.run(["journalctl", "-b", "-1", "--no-pager", *args], check=False, timeout=JOURNAL_TIMEOUT, log=log)


def previous_journal_boot() -> str | None:
    """The boot id (32 hex digits) of the boot before this one in the journal, if any."""
    try:
        proc = journalctl("-o", "json", "-n", "1", "--output-fields=_BOOT_ID")
        return str(json.loads(proc.stdout.splitlines()[-1])["_BOOT_ID"]) if proc.returncode == 0 else None
    except (common.CommandError, ValueError, IndexError, KeyError, TypeError):
        return None


def failed_boot_reason(installed_in: str | None = None) -> str:
    """What the journal of the previous boot says about why it did not stick. `installed_in` is
    the boot id of the boot that installed the update: when that is still the previous boot in
    the journal, the trial boots never reached userspace."""
    if common.find_tool("journalctl") is None:
        return "unknown (no journalctl)"
    previous = previous_journal_boot()
    if installed_in and previous and previous == installed_in.replace("-", ""):
        return NO_TRIAL_JOURNAL
    # The health checks' own words first, then any error of that boot. Needs a persistent
    # journal (/var/log/journal on the data partition).
    queries = (["-u", "kiln-health-*", "-p", "warning"], ["-p", "err"])
    for query in queries:
        try:
            proc = journalctl("-o", "cat", "-n", "15", *query)
        except common.CommandTimeout:
            return "unknown (journalctl timed out)"
        except common.ToolMissing:
            return "unknown (no journalctl)"
        if proc.returncode != 0:
            return ("the new slot never finished booting (no journal of the previous boot: the kernel or "
                    "initramfs failed before the journal was persisted)")
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        if lines:
            return "; ".join(lines[-6:])
    return "the previous boot logged no errors (the health checks did not complete)"


def recover_entry(state: State, boot: BootControl) -> None:
    """The power went out after the trial entry was written and before it was journaled: the entry
    is on the ESP, so the next boot may have been the trial. Journal it as if the run had (the boot id
    that installed it was journaled with the kernel), so a failed trial is settled as a rollback."""
    pending = state.pending or {}
    slot, version = pending.get("slot"), pending.get("version")
    if not pending.get("bootId"):
        return  # journaled by an agent that did not record it there: the resumed run writes the entry again
    # Entries of the target slot were removed before it was written: one of this version is ours.
    entry = next((e for e in boot.entries() if e.slot == slot and e.version == version
                  and boot.entry_complete(e.name)), None)
    if entry is None:
        return
    log(f"the trial entry {entry.name} of {version} exists but was not journaled (power cut): journaling it")
    pending.update(phase="entry", entry=entry_name(str(version), str(slot), pending.get("bootTries"), uki=entry.uki),
                   recovered=True)
    pending.setdefault("phases", {})["entry"] = now()
    state.save()


def cmd_boot(config: Config, release: Release, state: State, boot: BootControl) -> str:
    """Reconcile the state with the slot we booted. Returns what happened (for the log)."""
    pending = state.pending
    booted = boot.booted_slot()
    if booted is not None:
        trusted = state.trust(booted)
        if not trusted or trusted.get("version") != release.version:
            # The running slot is known-good by definition (we booted it); record it so status has it.
            state.set_trust(booted, {"version": release.version, "running": True, "verified": now()})
            state.save()
    if pending and pending.get("phase") == "kernel":
        recover_entry(state, boot)
    if not pending or pending.get("phase") != "entry":
        if pending:
            return f"an update to {pending.get('version')} was interrupted after {pending.get('phase')}; " \
                   "`kiln-agent update` resumes it"
        return f"running {release.version} from slot {booted}"
    slot, version = pending["slot"], pending["version"]
    if pending.get("bootId") and pending.get("bootId") == read_boot_id(config):
        return f"{version} is installed in slot {slot}; it boots on the next reboot"
    if booted == slot and release.version == version:
        entry = next((e for e in boot.entries() if e.slot == slot and e.version == version), None)
        if entry is not None and entry.blessed:
            state.event("update.success", key=f"success/{pending.get('digest')}/{pending.get('started')}",
                        version=version, slot=slot, previous=pending.get("from"))
            state.data["pending"] = None
            state.finish("success", version=version, slot=slot, previous=pending.get("from"))
            return f"{version} booted from slot {slot} and was blessed: update complete"
        return f"trial boot of {version} in slot {slot} (entry {entry.name if entry else '?'}): " \
               "waiting for the health checks to bless it"
    reason = failed_boot_reason(pending.get("bootId"))
    state.event("rollback", key=f"rollback/{pending.get('digest')}/{pending.get('started')}", version=version,
                digest=pending.get("digest"), slot=slot, backTo=release.version, reason=reason)
    event = {"version": version, "digest": pending.get("digest"), "slot": slot, "time": now(),
             "backTo": release.version, "bootedSlot": booted, "reason": reason}
    state.data["rollbacks"] = ([*state.data.get("rollbacks", []), event])[-MAX_ROLLBACKS:]
    for item in (version, pending.get("digest")):
        if item and item not in state.data["blocklist"]:
            state.data["blocklist"].append(item)
    state.data["pending"] = None
    state.set_trust(slot, None)
    removed = boot.remove_slot_entries(slot)
    state.finish("rolled-back", version=version, slot=slot, reason=reason, removedEntries=removed)
    return f"{version} in slot {slot} did not stick; back on {release.version} (slot {booted}): {reason}"
