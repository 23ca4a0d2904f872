"""The state journal (state.json, replaced atomically after every step), the lock, and the
fault points tests use to cut the power at a known step."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kiln_device.common import read_json, write_atomic
from kiln_device.contract import LOCKED
from kiln_device.errors import AgentError, log

STATE_SCHEMA = 1
MAX_ROLLBACKS = 20
PHASES = ("fetched", "invalidated", "built", "written", "verified", "kernel", "entry")
FAULT_ENV = "KILN_AGENT_FAULT"
FAULT_MARK_ENV = "KILN_AGENT_FAULT_MARK"
FAULT_MARK = "/run/kiln-agent.fault"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class State:
    """state.json: pending update (with its journaled phase), slot trust records, results."""

    def __init__(self, path: Path, events: Callable[..., None] | None = None) -> None:
        self.path = path
        self.events = events  # kind, **fields -> the outbox (kiln_device.agent.outbox.record)
        self.data: dict[str, Any] = {"schema": STATE_SCHEMA, "pending": None, "slots": {}, "lastResult": None,
                                     "rollbacks": [], "blocklist": []}
        if path.exists():
            try:
                loaded = read_json(path)
            except (OSError, ValueError) as exc:
                # Only ever replaced atomically: unreadable means the disk lies. Keep a copy, start clean
                # (no slot is trusted, so nothing half-written can be booted).
                log(f"{path}: unreadable ({exc}); keeping it as {path.name}.corrupt and starting over")
                path.replace(path.with_name(path.name + ".corrupt"))
                loaded = {}
            if isinstance(loaded, dict) and loaded.get("schema") == STATE_SCHEMA:
                self.data.update(loaded)

    def save(self) -> None:
        write_atomic(self.path, (json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode(), 0o640)

    @property
    def pending(self) -> dict[str, Any] | None:
        return self.data.get("pending")

    def journal(self, phase: str, **fields: Any) -> None:
        """Record that `phase` of the pending update is done, durably, then the fault hook."""
        pending = self.data["pending"]
        # The event first, keyed: a power cut before the save redoes the phase, which reports it once.
        self.event("update.phase", key=f"{pending.get('digest')}/{pending.get('started')}/{phase}",
                   version=pending.get("version"), phase=phase)
        pending.update(fields)
        pending["phase"] = phase
        pending.setdefault("phases", {})[phase] = now()
        self.save()
        log(f"journal: {phase}")
        fault_point(phase)

    def event(self, kind: str, key: str | None = None, **fields: Any) -> None:
        """Record an event in the outbox (kiln_device.agent.outbox.record); KEY makes it once only."""
        if self.events is not None:
            self.events(kind, key, **fields)

    def phase_done(self, phase: str) -> bool:
        pending = self.pending or {}
        return phase in (pending.get("phases") or {})

    def trust(self, slot: str) -> dict[str, Any] | None:
        return (self.data.get("slots") or {}).get(slot)

    def set_trust(self, slot: str, record: dict[str, Any] | None) -> None:
        self.data.setdefault("slots", {})[slot] = record

    def finish(self, result: str, **fields: Any) -> None:
        self.data["lastResult"] = {"result": result, "time": now(), **fields}
        self.save()


def blocklist(state: State) -> list[str]:
    return list(state.data.get("blocklist") or [])


def fault_point(point: str) -> None:
    """The testing hook (KILN_AGENT_FAULT): crash or stop at a named point."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"after:{point}":
        log(f"{FAULT_ENV}={fault}: exiting as if the power went out")
        os._exit(137)
    if fault == f"stop:{point}":
        mark = Path(os.environ.get(FAULT_MARK_ENV) or FAULT_MARK)
        log(f"{FAULT_ENV}={fault}: stopped at {point} (told {mark}); waiting for the power to go out")
        write_atomic(mark, f"{point}\n".encode())
        while True:
            time.sleep(3600)


@contextlib.contextmanager
def locked(state_dir: Path, wait: float = 0.0) -> Iterator[None]:
    """The agent's one lock: a boot, check or update at a time. Held by another run, it is waited
    for up to WAIT seconds (the boot's reconciliation right after a boot takes a few), then exit 10."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as f:
        deadline, said = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait:g} s)" if wait > 0 else ""
                    raise AgentError(LOCKED, f"another kiln-agent run holds {state_dir / '.lock'}{waited}") from None
                if not said:
                    log(f"another kiln-agent run holds {state_dir / '.lock'}: waiting up to {wait:g} s")
                    said = True
                time.sleep(0.2)
        yield
