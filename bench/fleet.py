"""Benchmark the fleet: simulated devices against the real `kiln fleet serve`, no VMs.

    .venv/bin/python -m bench.fleet [--json PATH] [--devices N] [--backend sqlite|postgresql|both]
                                    [--workers N]

Each simulated device is a directory with the agent's own code: its identity (an ed25519 key),
its outbox, its upload (kiln_device.agent.report), and its decision on the channel
(kiln_device.agent.trust: python-tuf's ngclient refreshes signed metadata from the loopback
HTTP server, then the rollout gate of the device's wave). What is not simulated: the image
download and the slot write (bench.ota measures those in QEMU).

The scenario, per backend (SQLite, then a PostgreSQL server started for the run):
1. release 2.0.0 with three waves (10 %, 50 %, 100 %), maxFailureRate 0.2, haltMinDevices 5;
2. round 1: every device checks its channel; the devices of wave 1 install, and 30 % of them roll
   back (injected); 10 % of all devices are offline (their uploads fail, their events wait);
   the service must halt the rollout before wave 2 opens: `advance` is refused, and no device of
   waves 2-3 ever starts 2.0.0;
3. round 2: the offline devices come back and upload what they kept;
4. release 2.0.1 (the fix) and open its waves one by one (advance --force): every device
   updates and reports.

Figures: reports (upload requests) and events ingested per second, report latency p50/p99 (one
signed POST, as the device sees it), the service's peak memory (VmHWM), stored events against
events sent (each exactly once), the halt, and the wall time of each round.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import describe_machine, make_parser, print_rows, write_figures
from builder.fleet.store import open_store
from builder.keys.tuf_keys import TrustKeys, make_trust_keys, trust_root
from builder.release import rollout
from builder.release.registry import serving_lookaside
from builder.release.trust import Release, Repository
from kiln_device.agent import report as agent_report
from kiln_device.agent import trust as agent_trust
from kiln_device.agent.config import Config, Fleet
from kiln_device.agent.identity import load_or_create
from kiln_device.agent.outbox import Outbox
from kiln_device.contract import parse_release
from kiln_device.errors import AgentError
from kiln_device.fleet import wave_of
from tests.fleet import kiln, running_fleet, running_postgres

CLS = "sim"
STAGES = [{"percent": 10, "soakHours": 0}, {"percent": 50, "soakHours": 0}, {"percent": 100, "soakHours": 0}]
FAIL_SHARE = 0.3  # of wave 1, rolled back
OFFLINE_SHARE = 0.1


@dataclass
class Latencies:
    lock: threading.Lock = field(default_factory=threading.Lock)
    seconds: list[float] = field(default_factory=list)
    events: int = 0

    def add(self, seconds: float, events: int) -> None:
        with self.lock:
            self.seconds.append(seconds)
            self.events += events


@contextlib.contextmanager
def timed_posts(lat: Latencies) -> Iterator[None]:
    """Time each report POST as the device sees it (the agent's own post function, wrapped)."""
    original = agent_report.post

    def post(config: Config, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        start = time.perf_counter()
        answer = original(config, path, body, headers)
        if path == "/v1/reports":
            lat.add(time.perf_counter() - start, body.count(b'"seq":'))
        return answer

    agent_report.post = post  # type: ignore[assignment]
    try:
        yield
    finally:
        agent_report.post = original  # type: ignore[assignment]


class Device:
    def __init__(self, root: Path, url: str, ca: Path, token: Path, lookaside: str, trust_root_file: Path) -> None:
        self.root = root
        self.url = url
        self.release = parse_release({"class": CLS, "compatible": f"kiln,{CLS}", "version": "1.0.0"})
        (root / "etc").mkdir(parents=True, exist_ok=True)  # each device its own copy: the agent deletes it once used
        shutil.copyfile(token, root / "etc/enroll.token")
        token = root / "etc/enroll.token"
        self.config = self.make_config(url, ca, token, lookaside, trust_root_file)
        self.id = load_or_create(self.config.identity_dir, "file").id  # one simulated device: one key file
        self.offline = False
        self.fails: set[str] = set()  # versions that roll back on this device (injected)
        self.blocked: set[str] = set()  # ... and that it then never takes again
        self.running = "1.0.0"

    def make_config(self, url: str, ca: Path, token: Path, lookaside: str, root_file: Path) -> Config:
        r = self.root
        return Config(registry="127.0.0.1:1", repository=f"kiln/{CLS}", channel="stable", lookaside=lookaside,
                      insecure=True, policy=r / "policy.json", release=r / "release.json", state_dir=r / "agent",
                      oci_dir=r / "oci", work_dir=r / "work", esp=r / "efi", slots={}, partuuids={},
                      cmdline=r / "cmdline", efivars=r / "efivars", boot_id=r / "boot_id", reboot_command=("true",),
                      trust_root=root_file, trust_dir=r / "tuf",
                      fleet=Fleet(url=url, ca=ca, token=token, outbox_max=2000, batch=200,
                                  identity="file"))

    def emit(self, kind: str, **fields: Any) -> None:
        Outbox(self.config.outbox_dir, 2000).append(kind, fields)

    def cycle(self) -> str:
        """One timer run: the channel decision, the (simulated) install, the upload."""
        release = parse_release({"class": CLS, "compatible": f"kiln,{CLS}", "version": self.running})
        try:
            channel = agent_trust.read_channel(self.config, release)
            chosen, waiting = agent_trust.choose(channel, release, self.id)
        except AgentError as exc:
            self.emit("channel.stale", status="unverified", code=exc.code, reason=exc.message)
            outcome = "error"
        else:
            if chosen is None or (waiting and chosen.version == self.running):
                self.emit("rollout.waiting", version=channel.newest(release.compatible).version,  # type: ignore[union-attr]
                          reason=waiting)
                outcome = "waiting"
            elif chosen.version == self.running or chosen.version in self.blocked:
                outcome = "current"
            else:
                v = chosen.version
                self.emit("update.started", version=v, previous=self.running)
                for phase in ("fetched", "invalidated", "built", "written", "verified", "kernel", "entry"):
                    self.emit("update.phase", version=v, phase=phase)
                self.emit("update.installed", version=v)
                if v in self.fails:
                    self.emit("rollback", version=v, reason="kiln-health-inference: golden check: 3 of 8 wrong")
                    self.blocked.add(v)
                    outcome = "rolled-back"
                else:
                    self.emit("update.success", version=v, previous=self.running)
                    self.emit("boot", version=v, slot="b")
                    self.running = v
                    outcome = "updated"
        self.config = self.make_config("https://127.0.0.1:9" if self.offline else self.url, self.config.fleet.ca,
                                       self.config.fleet.token, self.config.lookaside, self.config.trust_root)
        agent_report.upload(self.config, release, force=True)
        return outcome

    def upload(self) -> int:
        return agent_report.upload(self.config, self.release, force=True)


def run_backend(backend: str, db: str, n: int, workers: int, tmp: Path) -> dict[str, Any]:
    keys, lookaside = tmp / "keys", tmp / "lookaside"
    make_trust_keys(keys)
    repo = Repository(lookaside / "tuf", TrustKeys.load(keys))
    repo.init(trust_root(keys) or b"")
    root_file = tmp / "root.json"
    root_file.write_bytes(trust_root(keys) or b"")
    figures: dict[str, Any] = {"backend": backend, "devices": n}
    rng = random.Random(14)  # the failures injected: the same every run
    lat = Latencies()
    with serving_lookaside(lookaside) as la_url, \
            running_fleet(tmp / "svc", db, key_dir=keys, lookaside=lookaside) as svc, \
            timed_posts(lat), ThreadPoolExecutor(workers) as pool:
        token = tmp / "token"
        kiln("fleet", "token", CLS, "--uses", str(n), "--out", str(token), "--db", db)
        kiln("fleet", "allow", CLS, "--any-device", "--db", db)  # simulated devices: no serials to list
        start = time.perf_counter()
        devices = list(pool.map(lambda i: Device(tmp / "dev" / f"{i:05d}", svc.url, svc.ca, token, la_url,
                                                 root_file), range(n)))
        figures["setupSeconds"] = round(time.perf_counter() - start, 1)
        offline = set(rng.sample(range(n), int(n * OFFLINE_SHARE)))
        for i in offline:
            devices[i].offline = True
        wave1 = [d for d in devices if wave_of(d.id, [s["percent"] for s in STAGES]) == 1]
        failing = rng.sample(wave1, int(len(wave1) * FAIL_SHARE))
        for d in failing:
            d.fails.add("2.0.0")
        fake = b"manifest of 2.0.0"
        repo.publish(Release(CLS, "stable", "2.0.0", "sha256:" + hashlib.sha256(fake).hexdigest(),
                             len(fake), f"kiln,{CLS}"))
        rollout.start(repo, CLS, "stable", "2.0.0", rollout.policy(STAGES, 0.2, 5))

        lat.seconds.clear()
        lat.events = 0
        t0 = time.perf_counter()
        outcomes = list(pool.map(lambda d: d.cycle(), devices))
        r1 = time.perf_counter() - t0
        state = repo.rollout(CLS, "stable") or {}
        advance = kiln("rollout", "advance", CLS, "--channel", "stable", "--key", str(keys), "--lookaside",
                       str(lookaside), check=False)
        figures["round1"] = {"seconds": round(r1, 1), "outcomes": {o: outcomes.count(o) for o in set(outcomes)},
                             "wave1Devices": len(wave1), "injectedRollbacks": len(failing),
                             "halted": bool(state.get("halted")),
                             "haltReason": (state.get("halted") or {}).get("reason"),
                             "advanceRefused": advance.returncode != 0}

        for d in devices:
            d.offline = False
        t0 = time.perf_counter()
        list(pool.map(lambda d: d.upload(), [devices[i] for i in offline]))
        figures["round2"] = {"seconds": round(time.perf_counter() - t0, 1), "reconnected": len(offline)}

        fix = b"manifest of 2.0.1"
        repo.publish(Release(CLS, "stable", "2.0.1", "sha256:" + hashlib.sha256(fix).hexdigest(),
                             len(fix), f"kiln,{CLS}"))
        rollout.start(repo, CLS, "stable", "2.0.1", rollout.policy(STAGES, 0.2, 5))
        t0 = time.perf_counter()
        per_wave = []
        for wave in range(1, len(STAGES) + 1):
            if wave > 1:
                rollout.advance(repo, CLS, "stable", force=True)
            w0 = time.perf_counter()
            outs = list(pool.map(lambda d: d.cycle(), devices))
            per_wave.append({"wave": wave, "updated": outs.count("updated"), "seconds":
                             round(time.perf_counter() - w0, 1)})
        figures["round3"] = {"seconds": round(time.perf_counter() - t0, 1), "waves": per_wave,
                             "running": {v: sum(1 for d in devices if d.running == v) for v in ("1.0.0", "2.0.0",
                                                                                             "2.0.1")}}
        total_time = time.perf_counter() - start
        # Nobody outside wave 1 ever started 2.0.0: not before the halt, and not as a fallback while 2.0.1's
        # waves opened (a halted release is closed to every wave it had not reached).
        store = open_store(db)
        try:
            started = {d for d, e in ((d.id, store.events(d.id)) for d in devices)
                       if any(x["kind"] == "update.started" and x.get("version") == "2.0.0" for x in e)}
        finally:
            store.close()
        figures["round1"]["startedOutsideWave1"] = len(started - {d.id for d in wave1})
        sent = sum(int(Outbox(d.config.outbox_dir).meta().get("lastSeq") or 0) for d in devices)
        waiting = sum(Outbox(d.config.outbox_dir).count() for d in devices)
        store = open_store(db)
        try:
            stored = store.count_events()
        finally:
            store.close()
        hwm = 0
        for line in Path(f"/proc/{svc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
        secs = sorted(lat.seconds)
        busy = sum(secs)
        wall = r1 + figures["round2"]["seconds"] + figures["round3"]["seconds"]  # the rounds that report
        figures.update({
            "reports": len(secs), "events": lat.events,
            "eventsSent": sent, "eventsStored": stored, "eventsStillOnDevices": waiting,
            "reportsPerSecond": round(len(secs) / wall, 1), "eventsPerSecond": round(lat.events / wall, 1),
            "reportLatencyMs": {"p50": round(statistics.median(secs) * 1000, 1),
                                "p99": round(secs[int(len(secs) * 0.99) - 1] * 1000, 1),
                                "max": round(secs[-1] * 1000, 1), "mean": round(busy / len(secs) * 1000, 1)},
            "servicePeakRssBytes": hwm, "totalSeconds": round(total_time, 1), "workers": workers,
        })
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = make_parser("bench.fleet", __doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--workers", type=int, default=16, help="device threads (default 16)")
    ap.add_argument("--verbose", action="store_true", help="show the simulated agents' log lines")
    args = ap.parse_args(argv)
    quiet = open(os.devnull, "w") if not args.verbose else None  # noqa: SIM115 (closed at exit)
    results: dict[str, Any] = {"machine": describe_machine(), "devices": args.devices, "backends": {}}
    backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    for backend in backends:
        tmp = Path(tempfile.mkdtemp(prefix=f"kiln-bench-fleet-{backend}-", dir="/var/tmp"))
        try:
            with contextlib.redirect_stderr(quiet) if quiet else contextlib.nullcontext():
                if backend == "sqlite":
                    f = run_backend(backend, f"sqlite:///{tmp / 'fleet.db'}", args.devices, args.workers, tmp)
                else:
                    with running_postgres() as url:
                        f = run_backend(backend, url, args.devices, args.workers, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results["backends"][backend] = f
        print(f"\n{backend}, {args.devices} devices")
        r1 = f["round1"]
        print_rows([
            ("reports ingested", f"{f['reportsPerSecond']}/s", f"{f['reports']} signed uploads in all rounds"),
            ("events ingested", f"{f['eventsPerSecond']}/s", f"{f['events']} events"),
            ("report latency p50", f"{f['reportLatencyMs']['p50']} ms", "one signed POST, as the device sees it"),
            ("report latency p99", f"{f['reportLatencyMs']['p99']} ms", f"max {f['reportLatencyMs']['max']} ms"),
            ("service peak memory", f"{f['servicePeakRssBytes'] / 2**20:.1f} MiB", "VmHWM of kiln fleet serve"),
            ("events sent / stored", f"{f['eventsSent']}/{f['eventsStored']}",
             f"{f['eventsStillOnDevices']} still on devices (must be 0)"),
            ("halted in wave 1", "yes" if r1["halted"] else "NO", f"{r1['injectedRollbacks']} of "
             f"{r1['wave1Devices']} rolled back; advance refused: {r1['advanceRefused']}"),
            ("2.0.0 started outside wave 1", str(r1["startedOutsideWave1"]), "in any round; must be 0"),
            ("round 1 (decide, install, report)", f"{r1['seconds']} s", str(r1["outcomes"])),
            ("round 2 (offline devices return)", f"{f['round2']['seconds']} s",
             f"{f['round2']['reconnected']} devices"),
            ("round 3 (the fix, 3 waves)", f"{f['round3']['seconds']} s", str(f["round3"]["running"])),
        ])
    write_figures(args.json, results)
    bad = [b for b, f in results["backends"].items() if not f["round1"]["halted"] or f["round1"]["startedOutsideWave1"]
           or f["eventsSent"] != f["eventsStored"] or f["eventsStillOnDevices"]]
    if bad:
        print(f"error: the scenario's claims failed on {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
