"""The fleet's state per class, from the store and the rollout metadata: JSON, text and one HTML page.

Per class: the versions in the field, the rollout (its waves, each wave's devices, how many tried
the release, failed or rolled back, succeeded), the top failure reasons, stale and degraded
devices, events dropped on devices, and when each device was last seen.
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

from builder.core.output import inert
from builder.fleet.store import PENDING, Store
from kiln_device.fleet import wave_of

STALE_AFTER = 3 * 3600  # seconds without a report before a device is listed as not seen


def all_rollouts(repo: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(class, channel, rollout state) of every rollout (none without a repository or a rollout role)."""
    if repo is None or not repo.exists() or not repo.has("rollout"):
        return []
    out = []
    for path, target in repo.latest("rollout").signed.targets.items():
        cls, channel, _ = path.split("/", 2)
        out.append((cls, channel, dict(target.unrecognized_fields.get("custom") or {})))
    return out


def rollouts(repo: Any, cls: str) -> dict[str, dict[str, Any]]:
    """channel -> rollout state, for CLS."""
    return {channel: state for c, channel, state in all_rollouts(repo) if c == cls}


def wave_table(store: Store, cls: str, devices: list[dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    stages = state["stages"]
    outcomes = store.outcomes(cls, state["version"], state.get("resumed"))
    waves = [{"wave": n, "percent": s["percent"], "open": n <= int(state["wave"]), "devices": 0, "tried": 0,
              "failed": 0, "succeeded": 0} for n, s in enumerate(stages, 1)]
    reasons: Counter[str] = Counter()
    for d in devices:
        w = waves[wave_of(d["id"], [s["percent"] for s in stages]) - 1]
        w["devices"] += 1
        o = outcomes.get(d["id"])
        if o is None:
            continue
        w["tried"] += 1
        if o["failed"]:
            w["failed"] += 1
            reasons[str(o["reason"])[:200]] += 1
        elif o["succeeded"]:
            w["succeeded"] += 1
    tried = sum(w["tried"] for w in waves if w["open"])
    failed = sum(w["failed"] for w in waves if w["open"])
    succeeded = sum(w["succeeded"] for w in waves if w["open"])
    in_open = sum(w["devices"] for w in waves if w["open"])
    # Evidence before promotion: haltMinDevices successes in the open waves (all of their devices where they hold
    # fewer), and never none: a wave no device has succeeded in is not promoted, however empty it is.
    needed = max(1, min(int(state.get("haltMinDevices") or 1), in_open))
    return {**state, "maxFailureRate": float(state.get("maxFailureRate", 1)), "waves": waves, "tried": tried,
            "failed": failed, "succeeded": succeeded, "successesNeeded": needed,
            "failureRate": round(failed / tried, 4) if tried else 0.0,
            "topReasons": [{"reason": r, "devices": n} for r, n in reasons.most_common(3)]}


def fleet_status(store: Store, repo: Any, cls: str | None = None, *, now: float | None = None) -> dict[str, Any]:
    import time

    from builder.release.rollout import parse_time

    at = now if now is not None else time.time()
    devices = store.devices(cls)  # the fleet: accepted devices; pending ones are listed apart and count for nothing
    pending: dict[str, list[dict[str, Any]]] = {}
    for d in store.devices(cls, PENDING):
        pending.setdefault(d["class"], []).append(d)
    classes: dict[str, list[dict[str, Any]]] = {}
    for d in devices:
        classes.setdefault(d["class"], []).append(d)
    for name in pending:
        classes.setdefault(name, [])
    if cls and cls not in classes:
        classes[cls] = []
    out: dict[str, Any] = {"classes": {}, "database": store.describe(), "devices": len(devices),
                           "pending": sum(len(p) for p in pending.values())}
    for name, members in sorted(classes.items()):
        versions = Counter(d["version"] or "unknown" for d in members)
        not_seen = [{"device": d["id"], "lastSeen": d["last_seen"]} for d in members
                    if d["last_seen"] and at - parse_time(d["last_seen"]) > STALE_AFTER]
        out["classes"][name] = {
            "devices": len(members),
            "versions": dict(sorted(versions.items())),
            # ed25519: a key file on the device; ecdsa-p256: a key its TPM made (what the device says: not attested)
            "keys": dict(sorted(Counter(d["key_type"] for d in members).items())),
            "rollouts": {ch: wave_table(store, name, members, st) for ch, st in rollouts(repo, name).items()},
            "halts": store.halts(name),
            "stale": [{"device": d["id"], "channel": d["channel_state"]} for d in members if d["channel_state"]],
            "degraded": [{"device": d["id"], "degraded": d["degraded"]} for d in members if d["degraded"]],
            # devices whose newest event was dated ahead of the service's clock, or before 2020: their event times
            # are theirs; the service orders and soaks by the times it received them
            "clockOff": [{"device": d["id"], "skewSeconds": int(d["clock_skew"])} for d in members
                         if d["clock_skew"] is not None],
            # devices whose last boot did not have Secure Boot enforcing, or whose root no signed UKI bound (a
            # device that has not reported a boot yet is not counted)
            "unverified": [{"device": d["id"], "secureBoot": d["secure_boot"], "rootDigest": d["root_digest"]}
                           for d in members if d["slot"] and (d["secure_boot"] != "enabled" or not d["root_digest"])],
            "dropped": sum(int(d["dropped"] or 0) for d in members),
            "notSeen": not_seen,
            "lastSeen": max((d["last_seen"] for d in members if d["last_seen"]), default=None),
            "deviceList": [{"device": d["id"], "version": d["version"], "slot": d["slot"], "lastSeen": d["last_seen"],
                            "key": d["key_type"], "keyOrigin": d["key_origin"], "secureBoot": d["secure_boot"],
                            "rootDigest": d["root_digest"]} for d in members][:500],
            "pending": [{"device": d["id"], "enrolled": d["enrolled"], "serial": d["serial"], "key": d["key_type"],
                         "keyOrigin": d["key_origin"]} for d in pending.get(name, [])][:500],
        }
    return out


def render_text(status: dict[str, Any]) -> str:
    """`kiln fleet status` for people; device-supplied text (reasons, versions) made inert."""
    return inert(_render_text(status))


def _render_text(status: dict[str, Any]) -> str:
    lines = [f"{status['devices']} devices ({status['database']})"]
    if status.get("pending"):
        lines.append(f"{status['pending']} new devices wait for acceptance: kiln fleet devices --pending; "
                     "kiln fleet accept DEVICE")
    for name, c in status["classes"].items():
        lines.append(f"\n{name}: {c['devices']} devices, last seen {c['lastSeen'] or 'never'}")
        lines.append("  versions: " + (", ".join(f"{v} x{n}" for v, n in c["versions"].items()) or "none"))
        if c["keys"]:
            lines.append("  device keys: " + ", ".join(f"{k} x{n}" for k, n in c["keys"].items()))
        if c["pending"]:
            lines.append(f"  pending: {len(c['pending'])} devices (their reports are not taken)")
        for channel, r in c["rollouts"].items():
            state = f"HALTED ({r['halted']['reason']})" if r.get("halted") else f"wave {r['wave']} of {len(r['waves'])}"
            lines.append(f"  rollout of {r['version']} on {channel}: {state}; {r['failed']} of {r['tried']} failed "
                         f"({r['failureRate']:.0%}, halt above {r['maxFailureRate']:.0%})")
            for w in r["waves"]:
                lines.append(f"    wave {w['wave']} ({w['percent']}%{', open' if w['open'] else ''}): {w['devices']} "
                             f"devices, {w['tried']} tried, {w['succeeded']} succeeded, {w['failed']} failed")
            for reason in r["topReasons"]:
                lines.append(f"    {reason['devices']} x {reason['reason']}")
            if r.get("autoPromote") and not r.get("halted") and r["wave"] < len(r["waves"]) and \
                    r["succeeded"] < r["successesNeeded"]:
                lines.append(f"    auto-promotion waits for evidence: {r['succeeded']} of the "
                             f"{r['successesNeeded']} successes it needs in the open waves")
        for h in c["halts"]:
            lines.append(f"  halted by the service at {h['time']}: {h['version']} on {h['channel']}: {h['reason']}")
        if c["stale"]:
            lines.append(f"  stale channel: {len(c['stale'])} devices")
        if c["degraded"]:
            lines.append(f"  degraded: {len(c['degraded'])} devices ({c['degraded'][0]['degraded']})")
        if c["unverified"]:
            lines.append(f"  boot not verified: {len(c['unverified'])} devices (Secure Boot off, or a root no signed "
                         "UKI binds)")
        if c["dropped"]:
            lines.append(f"  events dropped on devices (outbox full): {c['dropped']}")
        if c["clockOff"]:
            lines.append(f"  clock off: {len(c['clockOff'])} devices (their newest event dated ahead of the service's "
                         "clock, or before 2020)")
        if c["notSeen"]:
            lines.append(f"  not seen for {STALE_AFTER // 3600} h: {len(c['notSeen'])} devices")
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1b1b}table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.halted{color:#b00020;font-weight:bold}.ok{color:#1b6e20}section{margin-bottom:2rem}"""


def render_html(status: dict[str, Any]) -> str:
    e = html.escape
    out = ["<!doctype html><html lang=en><head><meta charset=utf-8><title>Kiln fleet</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>Kiln fleet</h1><p id=total>{status['devices']} devices</p>"]
    for name, c in status["classes"].items():
        out.append(f"<section class=cls data-class='{e(name)}'><h2>{e(name)}</h2>")
        if c["pending"]:
            out.append(f"<p>pending: <span class=pending>{len(c['pending'])}</span> devices wait for acceptance</p>")
        out.append(f"<p><span class=devices>{c['devices']}</span> devices, last seen "
                   f"<span class=last-seen>{e(str(c['lastSeen'] or 'never'))}</span>; "
                   f"<span class=dropped>{c['dropped']}</span> events dropped on devices</p>")
        out.append("<table class=versions><tr><th>version</th><th>devices</th></tr>")
        out += [f"<tr><td>{e(v)}</td><td>{n}</td></tr>" for v, n in c["versions"].items()]
        out.append("</table>")
        for channel, r in c["rollouts"].items():
            state = (f"<span class=halted>halted: {e(r['halted']['reason'])}</span>" if r.get("halted")
                     else f"<span class=ok>wave {r['wave']} of {len(r['waves'])} open</span>")
            out.append(f"<h3 class=rollout data-channel='{e(channel)}' data-version='{e(r['version'])}'>"
                       f"rollout of {e(r['version'])} on {e(channel)}: {state}</h3>")
            out.append(f"<p>failure rate <span class=rate>{r['failureRate']:.0%}</span> "
                       f"({r['failed']} of {r['tried']}; halts above {r['maxFailureRate']:.0%})</p>")
            out.append("<table class=waves><tr><th>wave</th><th>percent</th><th>open</th><th>devices</th>"
                       "<th>tried</th><th>succeeded</th><th>failed</th></tr>")
            for w in r["waves"]:
                out.append(f"<tr><td>{w['wave']}</td><td>{w['percent']}%</td><td>{'yes' if w['open'] else 'no'}</td>"
                           f"<td>{w['devices']}</td><td>{w['tried']}</td><td>{w['succeeded']}</td>"
                           f"<td>{w['failed']}</td></tr>")
            out.append("</table>")
            if r["topReasons"]:
                out.append("<ol class=reasons>" + "".join(f"<li>{x['devices']} &times; {e(x['reason'])}</li>"
                                                          for x in r["topReasons"]) + "</ol>")
        if c["halts"]:
            out.append("<h3>halts</h3><ul class=halts>" + "".join(
                f"<li>{e(h['time'])}: {e(h['version'])} on {e(h['channel'])}: {e(h['reason'])}</li>"
                for h in c["halts"]) + "</ul>")
        if c["stale"] or c["degraded"]:
            out.append(f"<p>stale channel: <span class=stale>{len(c['stale'])}</span>; degraded: "
                       f"<span class=degraded>{len(c['degraded'])}</span></p>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)
