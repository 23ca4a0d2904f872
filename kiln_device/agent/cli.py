"""kiln-agent: signed A/B updates from an OCI registry, for a Kiln device.

Subcommands:
  check              look up the channel tag, read the candidate's manifest and labels
                     (no layers), decide whether to take it
  update [--no-reboot]
                     check, then: pull by digest into the OCI layout on the data
                     partition (skopeo, with the baked policy.json: the signature is
                     verified; only missing blobs move), decide again from the verified
                     config, unpack (umoci), write the INACTIVE slot (mkfs.erofs), read it
                     back and compare hashes (an image labelled dev.kiln.root-layers: build
                     the layers the store lacks, one erofs each, and write the slot's
                     layer list instead), install kernel + initramfs on the ESP, write
                     the boot entry kiln-<version>-<slot>+<tries>.conf atomically, reboot
  status [--json]    booted slot and version, pending update, last result, rollbacks, and
                     "degraded: <reason>" when this boot runs without its accelerator
                     (the class's fallback policy degrade; kiln_device.degraded)
  boot               on-boot reconciliation (kiln-agent-boot.service): a trial boot of the
                     slot we installed that got blessed is a success; a boot of the other
                     slot means the new one was rolled back: record why, blocklist it
  self-test          the agent can run: config, policy, key and tools present, state
                     writable (kiln-health-agent.service, gates boot-complete.target)
  report [--now]     enroll with the fleet service (agent.json fleet), then upload the outbox:
                     the events update, boot and the health checks append (kiln-agent-report.timer;
                     backs off after a failure unless --now; nothing to do without fleet.url)
  identity           print this device's id (its key is made on first use)
  trust-reset        forget the trusted channel metadata: the next check starts again from the
                     image's root (only when the last trusted root is lost: the agent never does
                     this by itself, since the image's root may trust keys a rotation retired)

Configuration: /usr/lib/kiln/agent.json (baked defaults), overridden key by key by
/etc/kiln/agent.json, then by --config FILE (or $KILN_AGENT_CONFIG). Keys: registry
(host:port[/path]), repository (default kiln/<class>), channel (default: the image's),
lookaside (signature server URL), insecure (plain HTTP / no TLS verification), policy,
release, stateDir, ociDir, workDir, esp, slots {a, b: block devices}, partuuids {a, b}
(default: found under /dev/disk/by-partuuid), cmdline, efivars, rebootCommand, timeouts
{check, fetch, unpack, build: seconds; defaults 120, 1800, 900, 900; a step that runs
longer is killed and the update fails: exit 7 for check and fetch, 9 for the others},
fleet {url (https://), ca, token, outboxMax, batch: docs/fleet.md}, window ("HH:MM-HH:MM"
UTC: outside it `update` only downloads, exit 14).

State: <stateDir>/state.json, replaced atomically after every step (a journal), so an
interrupted run resumes or starts over; a slot is trusted only once its verification
record (digest, sha256 of what was read back) is in the state.

Exit codes:
  0   ok (check: an update is available; update: installed, or rebooting into it)
  1   unexpected failure (a bug: please report it with the output)
  2   up to date: the channel carries the running version
  3   refused: the candidate's compatible string is not this device's, or it is a
      development image and this device runs a production one
  4   refused: not newer than the running version, below the running image's
      minVersion, or the candidate needs a newer running version (its minVersion)
  5   refused: this version failed on this device before (blocklisted)
  6   refused: signature or policy check failed, or the channel's TUF metadata does not verify
      (badly signed, replayed, mixed versions, damaged, oversized); nothing was written
  7   registry, signature or TUF metadata server unreachable, or the channel tag is missing
  8   not enough space on the data partition or the slot
  9   writing or verifying the slot, the kernel or the boot entry failed
  10  another kiln-agent run holds the lock (after --lock-wait seconds, 60 by default)
  11  configuration missing or invalid
  12  refused: the release is malformed (a label, its release.json, no kernel, bad kernel
      arguments); found before anything is written, its digest is blocklisted. Not a
      success status of kiln-agent.service (2-5 are)
  13  the channel's TUF metadata has expired (a frozen or stale channel): nothing is
      installed; `status` says stale since when; the timer keeps retrying
  14  waiting: the release's rollout has not reached this device's wave or is halted, or the
      maintenance window is closed (the update was downloaded, not applied), or the running
      slot is still on trial (not blessed: the other slot is the one it falls back to)
  64  usage

Testing hooks: KILN_AGENT_ROOT=DIR reads the two config files under DIR instead of /
(a fake device in a temp directory). KILN_AGENT_FAULT=after:<phase> exits with 137 right after <phase> is
journaled (a crash at a known point). KILN_AGENT_FAULT=stop:<point> stops there instead: it writes
<point> to /run/kiln-agent.fault (KILN_AGENT_FAULT_MARK) and sleeps, so a test can cut the power
(kill the VM) at that point. Phases: fetched, invalidated, built, written, verified, kernel, entry;
both also take `entry-written` (the trial entry is on the ESP, not yet journaled); stop: also takes
`writing` (half of the slot written, not yet fsynced as a whole) and `trust-refreshed` (new TUF
metadata written, not yet fsynced).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln_device.agent.bootctl import BootControl, make_boot_control, secure_boot_state
from kiln_device.agent.config import CONFIG_ENV, ROOT_ENV, Config, load_config, read_boot_id
from kiln_device.agent.identity import KEY_FILE, TPM_FILE, load_or_create
from kiln_device.agent.install import cmd_check, cmd_update
from kiln_device.agent.journal import State, blocklist, locked
from kiln_device.agent.outbox import Outbox, record
from kiln_device.agent.reconcile import cmd_boot
from kiln_device.agent.report import cmd_report
from kiln_device.agent.trust import reset_trust
from kiln_device.common import TOOL_PATH, Parser, read_json, write_atomic
from kiln_device.contract import (
    CONFIG,
    HEALTH_RESULT,
    LAYERS_KARG,
    NO_SPACE,
    OK,
    USAGE,
    WRITE_FAILED,
    Release,
    read_cmdline_value,
    under,
)
from kiln_device.degraded import read_degraded, summary
from kiln_device.errors import AgentError, log

sys.dont_write_bytecode = True  # /usr is read-only on the device


# --- status, self-test --------------------------------------------------------------------------


def health_summary(root: Path, boot_id: str | None) -> dict[str, Any] | None:
    """The golden inference check's result of this boot (contract.HEALTH_RESULT), in brief; None before
    it has run this boot."""
    try:
        result = read_json(under(root, HEALTH_RESULT))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or boot_id is None or result.get("boot_id") != boot_id:
        return None
    return {"status": result.get("status"), "exitCode": result.get("exit_code"),
            "models": [m.get("name") for m in result.get("models") or [] if isinstance(m, dict)],
            "checkedAt": result.get("checked_at")}


def root_mount(mounts: str) -> dict[str, Any] | None:
    """How / is mounted, from /proc/self/mounts' text: the last entry for / is the one in effect."""
    found = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "/":
            found = {"fstype": fields[2], "readOnly": "ro" in fields[3].split(",")}
    return found


def status_data(config: Config, release: Release, state: State, boot: BootControl) -> dict[str, Any]:
    # Degraded modes (kiln_device.degraded): this boot's state files that say degraded, and why.
    root = Path(os.environ.get(ROOT_ENV) or "/")
    found = read_degraded(root, read_boot_id(config))
    try:
        mounts = under(root, "/proc/self/mounts").read_text()
    except OSError:
        mounts = ""
    return {
        "degraded": summary(found), "degradedSources": [d.source for d in found],
        "class": release.cls, "compatible": release.compatible, "version": release.version,
        "bootedSlot": boot.booted_slot(), "selectedEntry": boot.selected_entry(), "bootControl": boot.name,
        "channel": config.channel, "source": config.source if config.registry else None,
        "pending": state.pending, "lastResult": state.data.get("lastResult"),
        "rollbacks": state.data.get("rollbacks", []), "blocklist": blocklist(state),
        "slots": state.data.get("slots", {}), "entries": [e.name for e in boot.entries()],
        # TUF: fresh, stale (expired metadata: nothing installs) or unverified; null without a TUF root.
        "trust": state.data.get("trust"),
        "fleet": fleet_status(config),
        "health": health_summary(root, read_boot_id(config)),  # this boot's golden inference check
        "root": root_mount(mounts),  # {"fstype": "erofs", "readOnly": true} on a Kiln device
        **boot_trust(config),
    }


def boot_trust(config: Config) -> dict[str, Any]:
    """Verified boot as this boot has it: the firmware's Secure Boot state, and the layer list digest the
    booted UKI's signed command line binds (null: a boot whose root nothing signed vouches for)."""
    try:
        cmdline = config.cmdline.read_text()
    except OSError:
        cmdline = ""
    return {"secureBoot": secure_boot_state(config.efivars), "rootDigest": read_cmdline_value(cmdline, LAYERS_KARG)}


def fleet_status(config: Config) -> dict[str, Any]:
    outbox = Outbox(config.outbox_dir, config.fleet.outbox_max)
    meta = outbox.meta()
    id_file = config.identity_dir / "id"
    key = "tpm" if (config.identity_dir / TPM_FILE).exists() else "file" if (config.identity_dir / KEY_FILE).exists() \
        else None
    return {"url": config.fleet.url or None, "device": id_file.read_text().strip() if id_file.is_file() else None,
            "key": key,
            "enrolled": meta.get("enrolled") == config.fleet.url if config.fleet.url else False,
            "state": meta.get("fleetState"), "tokenPresent": config.fleet.token.exists(),
            "outbox": outbox.count(), "dropped": int(meta.get("dropped") or 0),
            "failures": int(meta.get("failures") or 0), "lastError": meta.get("lastError"),
            "lastUpload": meta.get("lastUpload")}


def render_status(data: dict[str, Any]) -> str:
    lines = [f"{data['class']} {data['version']} from slot {data['bootedSlot'] or '?'} "
             f"(entry {data['selectedEntry'] or '?'}, {data['bootControl']})",
             f"channel {data['channel']} at {data['source'] or '(no registry configured)'}",
             f"secure boot: {data.get('secureBoot') or 'unknown'}; root "
             + (f"bound to {data['rootDigest']} by the signed UKI" if data.get("rootDigest") else
                "not bound to a signed UKI")]
    if data.get("degraded"):
        lines.append(f"degraded: {data['degraded']}")
    trust = data.get("trust")
    if trust:
        lines.append(f"channel metadata: {trust['status']} (checked {trust['checked']})"
                     + (f", stale since {trust['staleSince']}" if trust.get("staleSince") else "")
                     + (f": {trust['reason']}" if trust.get("reason") else ""))
        if trust.get("waiting"):
            lines.append(f"waiting: {trust['waiting']}")
        if trust.get("runningWithdrawn"):
            lines.append(f"the running release was withdrawn: {trust['runningWithdrawn'].get('reason')}")
    fleet = data.get("fleet") or {}
    if fleet.get("url"):
        lines.append(f"fleet {fleet['url']} as {fleet.get('device') or '(no identity yet)'}"
                     + (f" (key: {fleet['key']})" if fleet.get("key") else "")
                     + (f", {fleet['state']}" if fleet.get("state") else "") + f": {fleet['outbox']} events "
                     f"waiting, {fleet['dropped']} dropped" + (f"; last error: {fleet['lastError']}"
                                                               if fleet.get("lastError") else ""))
    pending = data["pending"]
    if pending:
        lines.append(f"pending: {pending['version']} -> slot {pending['slot']}, phase {pending['phase']}")
    last = data["lastResult"]
    if last:
        lines.append(f"last result: {last['result']} {last.get('version') or ''} at {last['time']}"
                     + (f": {last['reason']}" if last.get("reason") else ""))
    for rb in data["rollbacks"][-5:]:
        lines.append(f"rollback: {rb['version']} (slot {rb['slot']}) at {rb['time']}: {rb['reason']}")
    if data["blocklist"]:
        lines.append("blocklisted: " + ", ".join(v for v in data["blocklist"] if not v.startswith("sha256:")))
    return "\n".join(lines)


def cmd_self_test(config: Config, release: Release) -> list[str]:
    problems = []
    for tool in ("skopeo", "umoci", "mkfs.erofs", "fsverity", "tar"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + TOOL_PATH) is None:
            problems.append(f"{tool} is not installed")
    if not config.policy.is_file():
        problems.append(f"{config.policy} is missing")
    else:
        try:
            policy = read_json(config.policy)
            for req in (policy.get("transports", {}).get("docker", {}) or {}).values():
                for rule in req:
                    key = rule.get("keyPath")
                    if key and not Path(key).is_file():
                        problems.append(f"policy key {key} is missing")
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"{config.policy}: {exc}")
    if config.trust_root.is_file():  # the channel is verified with TUF: the agent's venv must have it
        try:
            import tuf.ngclient  # noqa: F401
        except ImportError as exc:
            problems.append(f"{config.trust_root} asks for TUF but python-tuf does not import: {exc}")
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(config.state_dir / ".self-test", b"ok\n")
        (config.state_dir / ".self-test").unlink()
    except OSError as exc:
        problems.append(f"state directory {config.state_dir} is not writable: {exc}")
    if not (config.esp / "loader").is_dir():
        problems.append(f"the ESP is not mounted at {config.esp} (no loader/ directory)")
    return problems


# --- command line ---------------------------------------------------------------------------


LOCK_WAIT = 60.0  # seconds: the boot's reconciliation, or a check, finishes well within it


def seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds (0 or more)")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kiln-agent", description=__doc__.split("\n\n")[0] if __doc__ else None,
                    epilog=__doc__.split("Exit codes:", 1)[1].join(["Exit codes:", ""]) if __doc__ else None,
                    formatter_class=argparse.RawDescriptionHelpFormatter, usage_code=USAGE)
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV), help="extra config file (highest priority)")
    parser.add_argument("--lock-wait", type=seconds, default=LOCK_WAIT, metavar="SECONDS",
                        help=f"how long boot, check and update wait for another run's lock (default {LOCK_WAIT:g})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    check = sub.add_parser("check", help="decide whether the channel's release should be taken")
    check.add_argument("--json", action="store_true")
    update = sub.add_parser("update", help="download, verify and install the channel's release")
    update.add_argument("--no-reboot", action="store_true", help="install, but do not reboot")
    status = sub.add_parser("status", help="booted slot, version, pending update, rollbacks")
    status.add_argument("--json", action="store_true")
    sub.add_parser("boot", help="on-boot reconciliation (run by kiln-agent-boot.service)")
    sub.add_parser("self-test", help="health check: the agent can run (kiln-health-agent.service)")
    report = sub.add_parser("report", help="upload the outbox to the fleet service (kiln-agent-report.timer)")
    report.add_argument("--now", action="store_true", help="ignore the backoff after a failed upload")
    sub.add_parser("trust-reset", help="forget the trusted channel metadata; start again from the image's root")
    identity = sub.add_parser("identity", help="print this device's id (--json: and where its key is)")
    identity.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return dispatch(args)
    except AgentError as exc:
        log(f"error: {exc.message}")
        return exc.code
    except NotImplementedError as exc:
        log(f"error: {exc}")
        return CONFIG
    except OSError as exc:
        log(f"error: {exc}")
        return NO_SPACE if exc.errno == errno.ENOSPC else WRITE_FAILED


def dispatch(args: argparse.Namespace) -> int:
    config, release = load_config(args.config)
    if args.command == "report":  # never under the update lock: an update never waits on the link
        return cmd_report(config, release, force=args.now)
    if args.command == "identity":
        ident = load_or_create(config.identity_dir, config.fleet.identity)
        if args.json:
            print(json.dumps({"device": ident.id, "keyType": ident.key_type, "store": ident.store,
                              "handle": hex(ident.tpm_handle) if ident.tpm_handle is not None else None,
                              "publicKey": ident.public_b64}, indent=2, sort_keys=True))
        else:
            print(ident.id)
        return OK
    if args.command == "self-test":
        problems = cmd_self_test(config, release)
        for p in problems:
            log(f"self-test: {p}")
        # A stale or unverified channel is reported, never a failed check: it must not roll a trial back.
        trust = State(config.state_dir / "state.json").data.get("trust") or {}
        if trust.get("status") in ("stale", "unverified"):
            log(f"self-test: warning: the channel's metadata is {trust['status']}"
                + (f" since {trust['staleSince']}" if trust.get("staleSince") else "") + f": {trust.get('reason')}")
        return CONFIG if problems else OK
    state_path = config.state_dir / "state.json"
    if args.command == "trust-reset":
        with locked(config.state_dir, wait=args.lock_wait):
            gone = reset_trust(config.trust_dir)
        log(f"forgot {', '.join(str(p) for p in gone) or 'nothing (no trusted metadata)'}: the next check starts "
            f"from the image's root, {config.trust_root}")
        return OK
    if args.command == "status":
        boot = make_boot_control(config, release.boot_control)
        data = status_data(config, release, State(state_path), boot)
        print(json.dumps(data, indent=2, sort_keys=True) if args.json else render_status(data))
        return OK
    with locked(config.state_dir, wait=args.lock_wait):
        state = State(state_path, functools.partial(record, config))
        boot = make_boot_control(config, release.boot_control)
        if args.command == "boot":
            log(cmd_boot(config, release, state, boot))
            try:  # the device's own key, made on its first boot (kiln_device.agent.identity)
                load_or_create(config.identity_dir, config.fleet.identity)
            except AgentError as exc:
                log(f"warning: {exc.message}")
            found = read_degraded(Path(os.environ.get(ROOT_ENV) or "/"), read_boot_id(config))
            state.event("boot", version=release.version, slot=boot.booted_slot(), degraded=summary(found) or None,
                        bootId=read_boot_id(config), **boot_trust(config))
            return OK
        cmd_boot(config, release, state, boot)  # a check or update first settles the last boot
        if args.command == "check":
            decision, cand = cmd_check(config, release, state)
            if args.json:
                print(json.dumps({"code": decision.code, "take": decision.take, "reason": decision.reason,
                                  "candidate": cand.__dict__}, indent=2, sort_keys=True))
            else:
                print(f"{'update available' if decision.take else 'no update'}: {decision.reason}")
            return decision.code
        return cmd_update(config, release, state, boot, reboot=not args.no_reboot)


if __name__ == "__main__":
    sys.exit(main())
