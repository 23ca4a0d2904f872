"""Where the fleet's reports live: SQLite by default, PostgreSQL when configured.

    store = open_store("sqlite:////var/lib/kiln-fleet/fleet.db")  # or postgresql://host/db
    store.migrate()                                               # versioned, idempotent

One SQL dialect for both (plain types, INSERT ... ON CONFLICT DO NOTHING); the placeholders are
written `?` and become `%s` for psycopg. Migrations are numbered and recorded in
`kiln_schema`; a database newer than this Kiln is refused, never downgraded.

Events are stored once per (device, seq): an upload retried after a lost answer stores nothing
twice, and the sequence keeps each device's events in order. Each device's request counter
only grows: a request with a counter already seen is a replay, refused before anything is
stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.errors import UsageError

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "devices, enrollment tokens, events", [
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY, class TEXT NOT NULL, compatible TEXT NOT NULL, public_key TEXT NOT NULL,
            enrolled TEXT NOT NULL, last_seen TEXT, counter BIGINT NOT NULL DEFAULT 0,
            dropped BIGINT NOT NULL DEFAULT 0, last_seq BIGINT NOT NULL DEFAULT 0, version TEXT, slot TEXT,
            degraded TEXT, channel_state TEXT)""",
        """CREATE TABLE tokens (
            hash TEXT PRIMARY KEY, class TEXT NOT NULL, uses_left BIGINT NOT NULL, expires DOUBLE PRECISION,
            created TEXT NOT NULL)""",
        """CREATE TABLE events (
            device TEXT NOT NULL, seq BIGINT NOT NULL, time TEXT NOT NULL, received TEXT NOT NULL,
            kind TEXT NOT NULL, version TEXT, reason TEXT, data TEXT NOT NULL, PRIMARY KEY (device, seq))""",
        "CREATE INDEX events_version ON events (version, kind)",
        "CREATE INDEX devices_class ON devices (class)",
    ]),
    (2, "rollout halts the service decided", [
        """CREATE TABLE halts (
            class TEXT NOT NULL, channel TEXT NOT NULL, version TEXT NOT NULL, time TEXT NOT NULL,
            reason TEXT NOT NULL, PRIMARY KEY (class, channel, version))""",
    ]),
    (3, "the type of each device's key (ed25519, or ecdsa-p256 from a TPM)", [
        "ALTER TABLE devices ADD COLUMN key_type TEXT NOT NULL DEFAULT 'ed25519'",
    ]),
    # Devices enrolled before this migration stay accepted (they were, under the old rules); every new
    # identity starts pending unless the allow-list names it.
    (4, "enrollment states (pending, accepted, rejected), the key's origin and serial, the allow-list", [
        "ALTER TABLE devices ADD COLUMN state TEXT NOT NULL DEFAULT 'accepted'",
        "ALTER TABLE devices ADD COLUMN key_origin TEXT NOT NULL DEFAULT 'unknown'",
        "ALTER TABLE devices ADD COLUMN serial TEXT",
        """CREATE TABLE allowed (
            class TEXT NOT NULL, serial TEXT NOT NULL, created TEXT NOT NULL, PRIMARY KEY (class, serial))""",
    ]),
    (5, "each device's clock skew, from the newest event of its last report", [
        "ALTER TABLE devices ADD COLUMN clock_skew BIGINT",
    ]),
    (6, "verified boot as each device's last boot had it: Secure Boot state, the root digest its UKI binds", [
        "ALTER TABLE devices ADD COLUMN secure_boot TEXT",
        "ALTER TABLE devices ADD COLUMN root_digest TEXT",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

# A device's enrollment state: only accepted devices report, and only their reports count toward a
# rollout's halt or promotion. ANY_SERIAL in the allow-list accepts every new device of its class.
PENDING, ACCEPTED, REJECTED = "pending", "accepted", "rejected"
STATES = (PENDING, ACCEPTED, REJECTED)
ANY_SERIAL = "*"
KEY_ORIGINS = ("tpm", "file", "unknown")

# What says a device tried a release (a waiting device or a download-only fetch did not).
TRIED_KINDS = ("update.started", "update.phase", "update.installed", "update.failed", "update.success", "rollback")
# What changes the summary of a device, from its events.
VERSION_KINDS = ("boot", "update.success")


def event_time(text: str) -> float | None:
    """Seconds since the epoch of a device's `YYYY-MM-DDTHH:MM:SSZ` (None: not one, or not a real date)."""
    import calendar

    if len(text) != 20:
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


CLOCK_SKEW = 300  # seconds an event may be dated ahead of the service's clock before the device's clock is off
CLOCK_FLOOR = 1577836800.0  # 2020-01-01: a device dating events before it has no clock set (no RTC, no NTP yet)


def clock_skew(events: list[dict[str, Any]], received: float) -> int | None:
    """How far the newest event is dated from RECEIVED, when that says the device's clock is off (ahead of the
    service's, or not set); None otherwise (events dated in the past may have waited in an outbox)."""
    newest = max((t for t in (event_time(str(e.get("time"))) for e in events) if t is not None), default=None)
    if newest is None or (newest - received <= CLOCK_SKEW and newest >= CLOCK_FLOOR):
        return None
    return int(newest - received)


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Refused(Exception):
    """A report or enrollment the service will not store: an HTTP status and a reason."""

    def __init__(self, status: int, reason: str, **detail: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail  # more for the device (a replay: the counter the service has)


@dataclass(frozen=True)
class Ingested:
    accepted: int
    duplicates: int
    ack: int
    failures: tuple[str, ...]  # versions this report says failed (a halt check follows)


class Store:
    backend = "?"

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()

    # --- connections ----------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    @contextlib.contextmanager
    def tx(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def sql(self, text: str) -> str:
        return text

    def close(self) -> None:
        pass

    # --- schema -----------------------------------------------------------------------------

    def version(self) -> int:
        with self.tx() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS kiln_schema (version BIGINT PRIMARY KEY, applied TEXT NOT NULL, "
                        "description TEXT NOT NULL)")
            cur.execute("SELECT MAX(version) FROM kiln_schema")
            row = cur.fetchone()
        return int(row[0] or 0)

    def migrate(self) -> list[int]:
        """Apply the migrations this database lacks, each in its own transaction; the ones applied."""
        have = self.version()
        if have > SCHEMA_VERSION:
            raise UsageError(f"{self.describe()}: schema version {have} is newer than this Kiln's "
                             f"({SCHEMA_VERSION}); upgrade Kiln, never downgrade the database")
        done = []
        for number, description, statements in MIGRATIONS:
            if number <= have:
                continue
            with self.tx() as cur:
                for statement in statements:
                    cur.execute(statement)
                cur.execute(self.sql("INSERT INTO kiln_schema (version, applied, description) VALUES (?, ?, ?)"),
                            (number, now_text(), description))
            done.append(number)
        return done

    def describe(self) -> str:
        return self.url

    # --- enrollment ---------------------------------------------------------------------------

    def add_token(self, token_hash: str, cls: str, uses: int, expires: float | None) -> None:
        with self.tx() as cur:
            cur.execute(self.sql("INSERT INTO tokens (hash, class, uses_left, expires, created) "
                                 "VALUES (?, ?, ?, ?, ?)"),
                        (token_hash, cls, uses, expires, now_text()))

    def enroll(self, device: str, cls: str, compatible: str, public_key: str, token_hash: str,
               version: str, key_type: str = "ed25519", *, key_origin: str = "unknown",
               serial: str | None = None) -> tuple[str, str]:
        """(what happened, the device's state): a new identity is accepted when the allow-list names its
        serial (one device per serial) or its whole class, and waits as pending otherwise."""
        with self.tx() as cur:
            cur.execute(self.sql("SELECT public_key, key_type, state FROM devices WHERE id = ?"), (device,))
            row = cur.fetchone()
            if row is not None:
                if (row[0], row[1]) != (public_key, key_type):
                    raise Refused(409, f"device {device} is enrolled with another key")
                if row[2] == REJECTED:
                    raise Refused(403, f"device {device} was rejected by an operator", state=REJECTED)
                return "already enrolled", str(row[2])
            cur.execute(self.sql("SELECT class, uses_left, expires FROM tokens WHERE hash = ?"  # noqa: S608
                                 + self.for_update()),
                        (token_hash,))
            tok = cur.fetchone()
            if tok is None:
                raise Refused(403, "unknown enrollment token")
            if tok[0] != cls:
                raise Refused(403, f"this enrollment token is for class {tok[0]}, not {cls}")
            if int(tok[1]) <= 0:
                raise Refused(403, "this enrollment token is used up")
            if tok[2] is not None and float(tok[2]) < time.time():
                raise Refused(403, "this enrollment token has expired")
            state = ACCEPTED if self._allowed(cur, cls, serial) else PENDING
            cur.execute(self.sql("INSERT INTO devices (id, class, compatible, public_key, key_type, enrolled, "
                                 "last_seen, version, state, key_origin, serial) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                        (device, cls, compatible, public_key, key_type, now_text(), now_text(), text(version), state,
                         key_origin, text(serial, 128)))
            if cur.rowcount == 1:  # not enrolled by a request running alongside: the token is used
                cur.execute(self.sql("UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?"), (token_hash,))
                return ("enrolled" if state == ACCEPTED else PENDING), state
        known = self.device_key(device)
        if known is None or known[:3] != (public_key, cls, key_type):
            raise Refused(409, f"device {device} is enrolled with another key or class")
        return "already enrolled", known[3]

    def _allowed(self, cur: Any, cls: str, serial: str | None) -> bool:
        cur.execute(self.sql("SELECT serial FROM allowed WHERE class = ? AND serial IN (?, ?)"),
                    (cls, ANY_SERIAL, serial or ANY_SERIAL))
        found = {str(r[0]) for r in cur.fetchall()}
        if ANY_SERIAL in found:
            return True
        if not serial or serial not in found:
            return False
        # One device per serial: a second identity claiming an accepted device's serial waits for an operator.
        cur.execute(self.sql("SELECT COUNT(*) FROM devices WHERE class = ? AND serial = ? AND state = ?"),
                    (cls, serial, ACCEPTED))
        return int(cur.fetchone()[0]) == 0

    def allow(self, cls: str, serials: list[str]) -> int:
        """Add SERIALS (ANY_SERIAL: every device) to CLS's allow-list; how many were new."""
        added = 0
        with self.tx() as cur:
            for serial in serials:
                cur.execute(self.sql("INSERT INTO allowed (class, serial, created) VALUES (?, ?, ?) "
                                     "ON CONFLICT DO NOTHING"), (cls, serial, now_text()))
                added += cur.rowcount
        return added

    def allowed(self, cls: str | None = None) -> list[tuple[str, str]]:
        where, args = ("WHERE class = ?", (cls,)) if cls else ("", ())
        with self.tx() as cur:
            cur.execute(self.sql(f"SELECT class, serial FROM allowed {where} ORDER BY class, serial"), args)  # noqa: S608
            return [(str(c), str(s)) for c, s in cur.fetchall()]

    def set_state(self, devices: list[str], state: str) -> list[str]:
        """Move DEVICES to STATE (accepted or rejected); the ids that are not enrolled here."""
        assert state in STATES, state
        unknown = []
        with self.tx() as cur:
            for device in devices:
                cur.execute(self.sql("UPDATE devices SET state = ? WHERE id = ?"), (state, device))
                if cur.rowcount == 0:
                    unknown.append(device)
        return unknown

    def device_key(self, device: str) -> tuple[str, str, str, str] | None:
        """The device's enrolled public key (base64), class, key type and enrollment state."""
        with self.tx() as cur:
            cur.execute(self.sql("SELECT public_key, class, key_type, state FROM devices WHERE id = ?"), (device,))
            row = cur.fetchone()
        return (str(row[0]), str(row[1]), str(row[2]), str(row[3])) if row else None

    def for_update(self) -> str:
        return ""

    # --- reports ------------------------------------------------------------------------------

    def ingest(self, device: str, counter: int, dropped: int, events: list[dict[str, Any]]) -> Ingested:
        received_at = time.time()
        received = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(received_at))
        skew = clock_skew(events, received_at)
        with self.tx() as cur:
            cur.execute(self.sql("SELECT counter, last_seq FROM devices WHERE id = ?"  # noqa: S608
                                 + self.for_update()), (device,))
            row = cur.fetchone()
            if row is None:
                raise Refused(401, f"device {device} is not enrolled")
            if counter <= int(row[0]):
                raise Refused(409, f"replayed report: counter {counter} was already used (last {row[0]})",
                              counter=int(row[0]))
            accepted = 0
            failures: list[str] = []
            summary: dict[str, Any] = {}
            for e in events:
                data = json.dumps(e, sort_keys=True)
                cur.execute(self.sql("INSERT INTO events (device, seq, time, received, kind, version, reason, data) "
                                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                            (device, e["seq"], e["time"], received, e["kind"],
                             text(e.get("version")), text(e.get("reason"), 2000), data))
                if cur.rowcount == 1:
                    accepted += 1
                    summarize(summary, e)
                    if is_failure(e) and e.get("version"):
                        failures.append(str(e["version"]))
                    continue
                cur.execute(self.sql("SELECT data FROM events WHERE device = ? AND seq = ?"), (device, e["seq"]))
                held = cur.fetchone()
                if held is not None and held[0] != data:
                    # Another event under a number it holds: the device's outbox went back (its meta.json restored
                    # or torn). Acknowledging would drop the new event; nothing of the report is stored, and the
                    # device renumbers what it has above lastSeq and sends again.
                    raise Refused(409, f"sequence number {e['seq']} is another event's: renumber above {row[1]}",
                                  lastSeq=int(row[1]))
            last_seq = max([int(row[1]), *(int(e["seq"]) for e in events)])
            sets = ["counter = ?", "dropped = ?", "last_seen = ?", "last_seq = ?", "clock_skew = ?"]
            values: list[Any] = [counter, dropped, received, last_seq, skew]
            for column, value in summary.items():
                sets.append(f"{column} = ?")
                values.append(text(value, 500))
            cur.execute(self.sql(f"UPDATE devices SET {', '.join(sets)} WHERE id = ?"), (*values, device))  # noqa: S608
        return Ingested(accepted, len(events) - accepted, last_seq, tuple(sorted(set(failures))))

    # --- reading ------------------------------------------------------------------------------

    def devices(self, cls: str | None = None, state: str | None = ACCEPTED) -> list[dict[str, Any]]:
        """The devices (of CLS) in STATE (None: every state): by default the accepted, which are the fleet."""
        cols = ("id", "class", "compatible", "enrolled", "last_seen", "dropped", "last_seq", "version", "slot",
                "degraded", "channel_state", "key_type", "state", "key_origin", "serial", "clock_skew",
                "secure_boot", "root_digest")
        conds = [(c, v) for c, v in (("class = ?", cls), ("state = ?", state)) if v]
        where = ("WHERE " + " AND ".join(c for c, _ in conds)) if conds else ""
        args = tuple(v for _, v in conds)
        with self.tx() as cur:
            cur.execute(self.sql(f"SELECT {', '.join(cols)} FROM devices {where} ORDER BY id"), args)  # noqa: S608
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def outcomes(self, cls: str, version: str, since: str | None = None) -> dict[str, dict[str, Any]]:
        """Per device of CLS that tried VERSION (received SINCE, a time the service wrote: a resumed rollout
        counts afresh): whether it failed and why (its last failure), whether it succeeded."""
        out: dict[str, dict[str, Any]] = {}
        marks = ", ".join("?" for _ in TRIED_KINDS)
        with self.tx() as cur:
            cur.execute(self.sql("SELECT e.device, e.kind, e.reason, e.data FROM events e JOIN devices d "  # noqa: S608
                                 f"ON d.id = e.device WHERE d.class = ? AND d.state = ? AND e.version = ? "
                                 f"AND e.kind IN ({marks}) AND e.received >= ? ORDER BY e.device, e.seq"),
                        (cls, ACCEPTED, version, *TRIED_KINDS, since or ""))
            for device, kind, reason, data in cur.fetchall():
                entry = out.setdefault(device, {"failed": False, "reason": None, "succeeded": False})
                if kind == "update.success":
                    entry["succeeded"] = True
                if is_failure(json.loads(data)):
                    entry.update(failed=True, reason=reason or kind)
        return out

    def events(self, device: str) -> list[dict[str, Any]]:
        with self.tx() as cur:
            cur.execute(self.sql("SELECT data FROM events WHERE device = ? ORDER BY seq"), (device,))
            return [json.loads(r[0]) for r in cur.fetchall()]

    def count_events(self) -> int:
        with self.tx() as cur:
            cur.execute("SELECT COUNT(*) FROM events")
            return int(cur.fetchone()[0])

    def record_halt(self, cls: str, channel: str, version: str, reason: str) -> None:
        with self.tx() as cur:
            cur.execute(self.sql("INSERT INTO halts (class, channel, version, time, reason) VALUES (?, ?, ?, ?, ?) "
                                 "ON CONFLICT DO NOTHING"), (cls, channel, version, now_text(), reason))

    def halts(self, cls: str | None = None) -> list[dict[str, Any]]:
        where, args = ("WHERE class = ?", (cls,)) if cls else ("", ())
        with self.tx() as cur:
            cur.execute(self.sql(f"SELECT class, channel, version, time, reason FROM halts {where} "  # noqa: S608
                                 "ORDER BY time"), args)
            return [dict(zip(("class", "channel", "version", "time", "reason"), r, strict=True))
                    for r in cur.fetchall()]


# Agent exit codes that say nothing about the release (kiln_device.contract): unreachable, no space,
# locked, stale, waiting.
NOT_THE_RELEASE = {7, 8, 10, 13, 14}


def text(value: Any, limit: int = 200) -> str | None:
    """A column's text: None stays None, anything else a string without NUL (PostgreSQL refuses it)."""
    return None if value is None else str(value).replace("\x00", "")[:limit]


def is_failure(event: dict[str, Any]) -> bool:
    if event.get("kind") == "rollback":
        return True
    return event.get("kind") == "update.failed" and event.get("code") not in NOT_THE_RELEASE


def summarize(summary: dict[str, Any], e: dict[str, Any]) -> None:
    kind = e["kind"]
    if kind in VERSION_KINDS and e.get("version"):
        summary["version"] = e["version"]
    if kind == "boot":
        summary["slot"] = e.get("slot")
        summary["degraded"] = e.get("degraded")
        summary["secure_boot"] = e.get("secureBoot")
        summary["root_digest"] = e.get("rootDigest")
    if kind == "channel.stale":
        summary["channel_state"] = f"{e.get('status', 'stale')}: {e.get('reason')}"[:500]
    if kind == "channel.fresh":
        summary["channel_state"] = None


class SQLiteStore(Store):
    backend = "sqlite"

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Device ids, token hashes and reports: readable by the service's user only. SQLite makes the -wal and
        # -shm files with the database's own mode, so creating it 0600 covers them too.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # a stored report survives a power cut of the service

    @contextlib.contextmanager
    def tx(self) -> Iterator[Any]:
        with self.lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def close(self) -> None:
        self.conn.close()


class PostgresStore(Store):
    backend = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        try:
            import psycopg
        except ImportError as exc:
            raise UsageError(f"PostgreSQL needs psycopg: {exc}", hint="pip install 'psycopg[binary]'") from None
        self.psycopg = psycopg
        self.local = threading.local()
        self.all: list[Any] = []
        self._connect()  # fail now, with a clear message, not at the first report

    def _connect(self) -> Any:
        conn = getattr(self.local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = self.psycopg.connect(self.url, autocommit=False, connect_timeout=10)
            except self.psycopg.Error as exc:
                raise UsageError(f"cannot connect to PostgreSQL at {self.describe()}: {str(exc).strip()}") from None
            self.local.conn = conn
            with self.lock:
                self.all.append(conn)
        return conn

    @contextlib.contextmanager
    def tx(self) -> Iterator[Any]:
        conn = self._connect()
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def migrate(self) -> list[int]:
        """One migrating process at a time (every `kiln fleet` command migrates): a session advisory lock."""
        conn = self._connect()
        conn.execute("SELECT pg_advisory_lock(7014)")
        conn.commit()
        try:
            return super().migrate()
        finally:
            conn.execute("SELECT pg_advisory_unlock(7014)")
            conn.commit()

    def for_update(self) -> str:
        return " FOR UPDATE"

    def describe(self) -> str:
        # Never the password: user@host:port/db only.
        from urllib.parse import urlsplit

        u = urlsplit(self.url)
        return f"postgresql://{u.username + '@' if u.username else ''}{u.hostname or ''}" \
               f"{':' + str(u.port) if u.port else ''}{u.path}"

    def close(self) -> None:
        with self.lock:
            for conn in self.all:
                with contextlib.suppress(Exception):
                    conn.close()
            self.all.clear()


def open_store(url: str) -> Store:
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if url.startswith("sqlite:///"):  # sqlite:///relative/path or sqlite:////absolute/path (SQLAlchemy's form)
        return SQLiteStore(url, Path(url.removeprefix("sqlite:///")))
    if "://" in url:
        raise UsageError(f"database {url.split('://', 1)[0]}://...: expected sqlite:///PATH or postgresql://...")
    return SQLiteStore(f"sqlite:///{Path(url).absolute()}", Path(url))
