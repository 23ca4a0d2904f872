"""The device's outbox: what happened, kept on the data partition until the fleet service has it.

One file per event (`<seq>.json`, written atomically and fsynced) in `<stateDir>/outbox/`, and
`meta.json` (the last sequence number, how many events were dropped, the upload counter and
backoff). An event's id is the device's id and its sequence number: the service stores each
(device, seq) once, so an upload retried after a lost answer stores nothing twice, and the
sequence orders the events. A power cut leaves at most the event being written unwritten: the
next sequence number is one above both meta.json's and the newest file's (and meta.json is raised
to what the service acknowledged), so none is reused. An event written before the step it reports
is saved carries a key; the step redone after a power cut finds the key and records nothing new.

If meta.json goes back (restored from an older copy, or a power cut before its rename), new events
can get numbers the service already holds for other events: it refuses them (409 with its
`lastSeq`), and `rebase` renumbers the waiting events above it, in order, and they are sent again.
The renumbering is written to meta.json first (`rebase`), so a power cut in the middle of it is
finished by the next read of the outbox: no event is lost, none is sent twice.

The outbox is bounded (agent.json fleet.outboxMax): when it is full the oldest events go, and
`dropped` counts them; every upload carries that count, so the service shows what it missed.
Appending never waits on the network and never fails the caller: an event that cannot be
written is logged and lost, never a failed update (`emit`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln_device.common import fsync_dir, read_json, write_atomic
from kiln_device.errors import log

if TYPE_CHECKING:
    from kiln_device.agent.config import Config

META = "meta.json"
SUFFIX = ".json"
MAX_EVENT_BYTES = 16 * 1024  # a reason longer than this is cut: the service refuses bigger events
RECENT_KEYS = 200  # idempotency keys remembered (meta.json) and newest files searched


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Event:
    seq: int
    path: Path
    data: dict[str, Any]


class Outbox:
    def __init__(self, directory: Path, limit: int = 2000) -> None:
        self.dir = directory
        self.limit = limit

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Appends and acknowledgements are short and exclusive; an upload's HTTP request holds no lock."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def meta(self) -> dict[str, Any]:
        try:
            data = read_json(self.dir / META)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_meta(self, meta: dict[str, Any]) -> None:
        write_atomic(self.dir / META, (json.dumps(meta, sort_keys=True) + "\n").encode(), 0o600)

    def _seqs(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name[:-len(SUFFIX)]) for p in self.dir.iterdir()
                      if p.name.endswith(SUFFIX) and p.name[:-len(SUFFIX)].isdigit())

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}{SUFFIX}"

    def _recorded(self, key: str, meta: dict[str, Any], seqs: list[int]) -> int | None:
        """The sequence number of the event recorded under KEY, if any (meta's recent keys, then the newest
        files: a power cut can fall between an event file and meta.json)."""
        if key in (meta.get("keys") or {}):
            return int(meta["keys"][key])
        for seq in reversed(seqs[-RECENT_KEYS:]):
            try:
                if read_json(self._path(seq)).get("key") == key:
                    return seq
            except (OSError, ValueError, AttributeError):
                continue
        return None

    def append(self, kind: str, fields: dict[str, Any], key: str | None = None) -> int:
        """Write one event durably; returns its sequence number. With KEY, an event already recorded under that
        key is not recorded again (a step redone after a power cut reports once)."""
        with self.locked():
            meta = self.meta()
            seqs = self._seqs()
            if key is not None:
                done = self._recorded(key, meta, seqs)
                if done is not None:
                    return done
            seq = max([int(meta.get("lastSeq") or 0), *seqs]) + 1
            event = {"seq": seq, "time": now(), "kind": kind, **fields, **({"key": key} if key else {})}
            body = json.dumps(event, sort_keys=True, default=str).encode()
            if len(body) > MAX_EVENT_BYTES:  # a runaway reason: keep the event, cut the text
                event = {k: (v[:2000] + "…" if isinstance(v, str) and len(v) > 2000 else v) for k, v in event.items()}
                body = json.dumps(event, sort_keys=True, default=str)[:MAX_EVENT_BYTES].encode()
                if len(body) >= MAX_EVENT_BYTES:
                    body = json.dumps({"seq": seq, "time": event["time"], "kind": kind, "truncated": True}).encode()
            overflow = len(seqs) + 1 - self.limit
            for old in seqs[:max(overflow, 0)]:  # full: the oldest go, counted
                self._path(old).unlink(missing_ok=True)
            write_atomic(self._path(seq), body, 0o600)
            meta["lastSeq"] = seq
            if key is not None:
                keys = dict(meta.get("keys") or {})
                keys[key] = seq
                meta["keys"] = dict(list(keys.items())[-RECENT_KEYS:])
            if overflow > 0:
                meta["dropped"] = int(meta.get("dropped") or 0) + overflow
            self.save_meta(meta)
            return seq

    def rebase(self, after: int) -> int:
        """Renumber every waiting event above AFTER (the service's last sequence number for this device), in
        order, and never below any number already handed out; how many were renumbered."""
        with self.locked():
            meta = self.meta()
            seqs = self._seqs()
            base = max([after, int(meta.get("lastSeq") or 0), *seqs])
            meta["rebase"] = {"from": seqs, "base": base}
            meta["lastSeq"] = base + len(seqs)
            self.save_meta(meta)  # first: a power cut from here on is finished by _finish_rebase
            self._finish_rebase(meta)
            return len(seqs)

    def _finish_rebase(self, meta: dict[str, Any]) -> None:
        """Carry out meta.json's `rebase` (idempotent): each old file rewritten under its new number, then gone."""
        plan = meta.get("rebase")
        if not isinstance(plan, dict):
            return
        base = int(plan.get("base") or 0)
        for n, old in enumerate(plan.get("from") or [], 1):
            old_path, new_path = self._path(int(old)), self._path(base + n)
            try:
                data = read_json(old_path)
            except FileNotFoundError:
                continue  # done before a power cut
            except (OSError, ValueError):
                old_path.unlink(missing_ok=True)  # torn: counted as pending() would
                meta["dropped"] = int(meta.get("dropped") or 0) + 1
                continue
            if not new_path.exists():
                write_atomic(new_path, json.dumps({**data, "seq": base + n}, sort_keys=True).encode(), 0o600)
            old_path.unlink()
        fsync_dir(self.dir)
        meta.pop("rebase", None)
        self.save_meta(meta)

    def pending(self, limit: int) -> list[Event]:
        """The oldest LIMIT events, in order (an unreadable file, a torn write from a disk that lies, is dropped
        and counted)."""
        if "rebase" in self.meta():
            with self.locked():
                self._finish_rebase(self.meta())
        out: list[Event] = []
        for seq in self._seqs():
            if len(out) >= limit:
                break
            path = self._path(seq)
            try:
                data = read_json(path)
                if not isinstance(data, dict) or data.get("seq") != seq:
                    raise ValueError("not an event of this outbox")
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                log(f"outbox: {path.name} is unreadable ({exc}); dropping it")
                with self.locked():
                    path.unlink(missing_ok=True)
                    meta = self.meta()
                    meta["dropped"] = int(meta.get("dropped") or 0) + 1
                    self.save_meta(meta)
                continue
            out.append(Event(seq, path, data))
        return out

    def acknowledge(self, upto: int, sent: list[Event]) -> None:
        """The service has every event of SENT up to UPTO: they go."""
        with self.locked():
            meta = self.meta()
            if upto > int(meta.get("lastSeq") or 0):  # never hand out a number the service has seen
                meta["lastSeq"] = upto
                self.save_meta(meta)
            for event in sent:
                if event.seq <= upto:
                    event.path.unlink(missing_ok=True)
            fsync_dir(self.dir)

    def count(self) -> int:
        return len(self._seqs())


def emit(directory: Path, limit: int, kind: str, key: str | None = None, **fields: Any) -> None:
    """Append an event; never raises (an outbox that cannot be written must not fail an update)."""
    try:
        Outbox(directory, limit).append(kind, fields, key)
    except (OSError, ValueError, TypeError) as exc:
        log(f"outbox: could not record {kind}: {exc}")



def record(config: Config, kind: str, key: str | None = None, **fields: Any) -> None:
    """emit() into the device's outbox (agent.json stateDir, fleet.outboxMax)."""
    emit(config.outbox_dir, config.fleet.outbox_max, kind, key, **fields)
