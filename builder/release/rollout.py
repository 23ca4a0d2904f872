"""Staged rollouts: a release opens to its class's `rollout.stages` one wave at a time, and halts.

The state of a channel's rollout is one signed target, `<class>/<channel>/rollout`, of the
delegated `rollout` role in the channel's TUF repository (builder.release.trust): devices read it with
their channel metadata, from the same static server, so a halt reaches them even when the fleet
service is down, and nothing but the rollout key can forge it. Its `custom`:

    {"version": "1.3.0", "stages": [{"percent": 10, "soakHours": 1}, ...], "wave": 1,
     "opened": ["2026-11-30T14:00:00Z"], "halted": null | {"reason", "time", "by"},
     "maxFailureRate": "0.2", "haltMinDevices": 3, "resumed": "...",
     "closed": [{"version": "1.2.0", "wave": 1, "halted": true}]}

`wave` is how many waves are open; a device is in the first wave whose cumulative percent is
above its stable place (kiln_device.fleet.wave_of). `closed` lists the releases whose rollouts
were replaced before they finished, with the waves they reached. `kiln release` starts the rollout of each
new release at wave 1; `kiln rollout advance` opens the next wave once the current one has
soaked; the fleet service halts it by itself when the failure rate of the open waves goes over
`maxFailureRate` (builder.fleet.service), and `kiln rollout halt|resume` do it by hand.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from builder.core.errors import UsageError
from builder.core.output import inert
from builder.release.trust import Repository


def now_text(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at if at is not None else time.time()))


def parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def policy(stages: list[dict[str, Any]], max_failure_rate: float, halt_min_devices: int,
           auto_promote: bool = False) -> dict[str, Any]:
    """The rollout policy as signed metadata carries it: TUF's canonical JSON has no floats, so the rate is
    a decimal string ("0.2"). AUTO_PROMOTE (spec rollout.autoPromote): the fleet service opens the next
    wave by itself once the current one has soaked without going over the failure rate."""
    return {"stages": [{"percent": int(s["percent"]), "soakHours": int(s.get("soakHours") or 0)} for s in stages],
            "maxFailureRate": f"{float(max_failure_rate):g}", "haltMinDevices": int(halt_min_devices),
            "autoPromote": bool(auto_promote)}


MAX_CLOSED = 50


def start(repo: Repository, cls: str, channel: str, version: str, rollout_policy: dict[str, Any]) -> dict[str, Any]:
    """Open wave 1 of VERSION (a new release); the state. A rollout it replaces that had not opened every
    wave, or was halted, is closed: its version goes in `closed`, which no device outside the waves it
    reached may take any more (kiln_device.fleet.rollout_gate), so a halted release is never the fallback
    of the devices the new one keeps waiting."""

    def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
        if current and current.get("version") == version:
            return None  # released again (same digest): the rollout goes on where it is
        closed = list((current or {}).get("closed") or [])
        if current and (current.get("halted") or int(current["wave"]) < len(current["stages"])):
            closed.append({"version": current["version"], "wave": int(current["wave"]),
                           "halted": bool(current.get("halted"))})
        return {"version": version, **rollout_policy, "wave": 1, "opened": [now_text()], "halted": None,
                "closed": closed[-MAX_CLOSED:]}

    return repo.update_rollout(cls, channel, change) or {}


def require(state: dict[str, Any] | None, cls: str, channel: str) -> dict[str, Any]:
    if not state:
        raise UsageError(f"{cls} has no rollout on {channel}",
                         hint="`kiln release` starts one for each release of a class")
    return state


def soak_left(state: dict[str, Any], at: float | None = None) -> float:
    """Seconds until the current wave has soaked (0: it has)."""
    wave = int(state["wave"])
    hours = float(state["stages"][wave - 1].get("soakHours") or 0)
    opened = parse_time(state["opened"][wave - 1])
    return max(0.0, opened + hours * 3600 - (at if at is not None else time.time()))


def advance(repo: Repository, cls: str, channel: str, *, force: bool = False,
            version: str | None = None) -> dict[str, Any]:
    """Open the next wave (of VERSION only, when given: the service's promotion of a release another has
    replaced since is refused like any other)."""
    def change(current: dict[str, Any] | None) -> dict[str, Any]:
        state = require(current, cls, channel)
        if version is not None and state.get("version") != version:
            raise UsageError(f"the rollout of {cls} on {channel} is now of {state.get('version')}, not {version}")
        wave, stages = int(state["wave"]), state["stages"]
        if state.get("halted"):
            raise UsageError(f"the rollout of {cls} {state['version']} is halted ({state['halted']['reason']})",
                             hint=f"`kiln rollout resume {cls}` once the cause is fixed")
        if wave >= len(stages):
            raise UsageError(f"the rollout of {cls} {state['version']} is complete: all {len(stages)} waves are open")
        left = soak_left(state)
        if left > 0 and not force:
            raise UsageError(f"wave {wave} of {cls} {state['version']} soaks for {left / 3600:.1f} more hours "
                             f"(soakHours {stages[wave - 1]['soakHours']})", hint="--force opens the next wave now")
        return {**state, "wave": wave + 1, "opened": [*state["opened"], now_text()]}

    return repo.update_rollout(cls, channel, change) or {}


def halt(repo: Repository, cls: str, channel: str, reason: str, by: str, *,
         version: str | None = None) -> dict[str, Any]:
    """Halt the rollout (of VERSION only, when given: a halt decided for a release another has replaced
    since is dropped)."""
    def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
        state = require(current, cls, channel)
        if state.get("halted") or (version is not None and state.get("version") != version):
            return None
        return {**state, "halted": {"reason": reason, "time": now_text(), "by": by}}

    return repo.update_rollout(cls, channel, change) or {}


def resume(repo: Repository, cls: str, channel: str) -> dict[str, Any]:
    def change(current: dict[str, Any] | None) -> dict[str, Any]:
        state = require(current, cls, channel)
        if not state.get("halted"):
            raise UsageError(f"the rollout of {cls} {state['version']} is not halted")
        return {**state, "halted": None, "resumed": now_text()}

    return repo.update_rollout(cls, channel, change) or {}


def describe(state: dict[str, Any]) -> str:
    """One line for people; the halt reason may be devices' own text (the service's halt), so it is made inert."""
    return inert(_describe(state))


def _describe(state: dict[str, Any]) -> str:
    stages = state["stages"]
    wave = int(state["wave"])
    text = (f"{state['version']}: wave {wave} of {len(stages)} open ({stages[wave - 1]['percent']}% of devices) "
            f"since {state['opened'][wave - 1]}")
    if state.get("halted"):
        text += f"; HALTED at {state['halted']['time']} by {state['halted']['by']}: {state['halted']['reason']}"
    elif wave < len(stages):
        left = soak_left(state)
        text += f"; wave {wave + 1} may open " + (f"in {left / 3600:.1f} h" if left else "now")
    return text
