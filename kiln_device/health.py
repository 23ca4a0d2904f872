"""Golden-set health check of the device's inference models (kiln-health-inference).

For every model in /usr/lib/kiln/release.json: verify the model file's sha256,
load its golden set (golden.npz next to it: inputs, expected outputs, tolerance;
format 2 holds samples of any size each), run it through onnxruntime in this
process, and time single-sample inferences on one thread (--runs, stopping after
--seconds once 10 are done). With --service URL, also run the golden set through
the running inference service. The check fails when an output differs from the
expected one by more than the golden tolerance (max abs diff; the worst sample is
reported), when a top-1 class (argmax) differs (classifiers), or when the p95
latency exceeds the envelope: the model's own (p95LatencyMs on the model in
release.json) or else the class's (p95LatencyMs at the top).

kiln-health-inference.service runs it before boot-complete.target; it writes its
last result to /var/lib/kiln/health/inference.json (atomically).

exit codes:
  0   healthy
  1   outputs wrong (beyond tolerance, or a different argmax), in process or via the service
  2   too slow: p95 latency over the envelope
  3   model or golden set missing or corrupt, sha256 mismatch, model does not load,
      release.json unreadable
  4   service unreachable or erroring (only with --service)
  5   the accelerator is unavailable (the models run on the CPU) and the class's fallback
      policy is fail
  64  usage
When several apply, the first of 3, 5, 1, 4, 2 wins; --json lists every problem.

Degraded: when the accelerator is unavailable and the class's fallback policy is degrade,
the check holds the CPU to the degraded envelope (the model's fallbackP95LatencyMs, else
release.json fallback.p95LatencyMs, else the model's p95LatencyMs), passes
with status "degraded" and records degraded and the reason (kiln_device.degraded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from kiln_device import degraded as dm
from kiln_device import inference as ki
from kiln_device.common import Parser, first_line, make_logger, write_json_atomic
from kiln_device.contract import ACCELERATOR_STATE, HEALTH_RESULT, Release, under

HEALTHY, WRONG, SLOW, BROKEN, SERVICE, ACCELERATOR, USAGE = 0, 1, 2, 3, 4, 5, 64
PRECEDENCE = (BROKEN, ACCELERATOR, WRONG, SERVICE, SLOW)
NAMES = {HEALTHY: "healthy", WRONG: "outputs-wrong", SLOW: "too-slow", BROKEN: "model-broken",
         SERVICE: "service-failed", ACCELERATOR: "accelerator-unavailable", USAGE: "usage"}
DEGRADED = "degraded"  # the status of a passing check on the CPU fallback (policy degrade)
HEALTH = HEALTH_RESULT.lstrip("/")
GOLDEN = "golden.npz"
GOLDEN_KEYS = ("x", "outputs", "labels", "tolerance", "input_name", "output_name")
DEFAULT_RUNS = 200
DEFAULT_SECONDS = 3.0
MIN_BUDGET_RUNS = 10  # when --seconds cuts timing short: p95 of 10 runs is about their maximum (conservative)
MIN_RUNS = 20
WARMUP_RUNS = 10
MAX_SHOWN = 5


@dataclass(frozen=True)
class Problem:
    code: int
    model: str | None
    message: str


@dataclass(frozen=True)
class Golden:
    path: str
    x: np.ndarray
    outputs: np.ndarray
    labels: np.ndarray
    tolerance: float
    input_name: str
    output_name: str
    # Format 2 (builder.model.validate.write_golden_samples): one input and output per sample, of
    # any size each (x and outputs above are then empty); argmax: whether top-1 must match too.
    samples: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    argmax: bool = True

    @property
    def count(self) -> int:
        return len(self.samples) if self.samples else len(self.x)


class ServiceError(Exception):
    pass


say = make_logger("kiln-health-inference")


# -- golden set ---------------------------------------------------------------------------------


def load_golden(entry: ki.ModelEntry) -> Golden:
    """golden.npz next to the model file, checked; a ModelProblem when missing or corrupt."""
    shown = str(PurePosixPath(entry.path).parent / GOLDEN)
    where = f"model {entry.name} {entry.version}: golden set {shown}"
    path = entry.directory / GOLDEN
    if not path.is_file():
        raise ki.ModelProblem(f"{where} is missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ki.ModelProblem(f"{where} is unreadable: {first_line(exc)}") from None
    if "format" in arrays:
        return _golden_samples(shown, where, arrays)
    missing = [k for k in GOLDEN_KEYS if k not in arrays]
    if missing:
        raise ki.ModelProblem(f"{where} lacks {', '.join(missing)}")
    x, outputs, tolerance = arrays["x"], arrays["outputs"], arrays["tolerance"]
    if x.ndim < 2 or len(x) == 0 or outputs.ndim < 1 or len(outputs) != len(x):
        raise ki.ModelProblem(f"{where} is inconsistent: x {list(x.shape)}, outputs {list(outputs.shape)}")
    if tolerance.shape != () or not np.isfinite(tolerance) or tolerance < 0:
        raise ki.ModelProblem(f"{where} has an invalid tolerance {tolerance!r}")
    return Golden(shown, x, outputs, arrays["labels"], float(tolerance), str(arrays["input_name"]),
                  str(arrays["output_name"]))


def _golden_samples(shown: str, where: str, arrays: dict[str, np.ndarray]) -> Golden:
    """Format 2: count, x.I and outputs.I per sample, tolerance, argmax, the input and output names."""
    if arrays["format"].shape != () or int(arrays["format"]) != 2:
        raise ki.ModelProblem(f"{where} has format {arrays['format']!r}; this agent reads formats 1 and 2")
    missing = [k for k in ("count", "tolerance", "input_name", "output_name", "argmax") if k not in arrays]
    if missing:
        raise ki.ModelProblem(f"{where} lacks {', '.join(missing)}")
    count = int(arrays["count"])
    samples = []
    for i in range(count):
        x, out = arrays.get(f"x.{i}"), arrays.get(f"outputs.{i}")
        if x is None or out is None or x.ndim < 1 or len(x) == 0 or out.ndim < 1 or len(out) != len(x):
            raise ki.ModelProblem(f"{where}: sample {i} is missing or inconsistent")
        samples.append((x, out))
    tolerance = arrays["tolerance"]
    if count < 1 or tolerance.shape != () or not np.isfinite(tolerance) or tolerance < 0:
        raise ki.ModelProblem(f"{where} is inconsistent: {count} samples, tolerance {tolerance!r}")
    empty = np.zeros((0,), np.float32)
    return Golden(shown, empty, empty, arrays.get("labels", np.zeros(0, np.int64)), float(tolerance),
                  str(arrays["input_name"]), str(arrays["output_name"]), tuple(samples), bool(arrays["argmax"]))


def _fits(model: ki.LoadedModel, x: np.ndarray) -> bool:
    dims = model.input_shape
    return x.ndim == len(dims) and all(not isinstance(d, int) or d == s for d, s in zip(dims, x.shape, strict=True))


def check_fits(model: ki.LoadedModel, golden: Golden) -> np.ndarray:
    """The golden inputs as the model's input tensor; a ModelProblem when they were made for another model."""
    name = model.entry.name
    if (golden.input_name, golden.output_name) != (model.input_name, model.output_name):
        raise ki.ModelProblem(f"model {name}: golden set is for {golden.input_name} -> {golden.output_name}, "
                              f"the model has {model.input_name} -> {model.output_name}")
    for i, (x, _) in enumerate(golden.samples):
        if not _fits(model, x):
            raise ki.ModelProblem(f"model {name}: golden sample {i} {list(x.shape)} does not fit the model input "
                                  f"{model.shape_text()}")
    if golden.samples:
        return golden.x
    dims = model.input_shape[1:]
    sample = golden.x.shape[1:]
    if len(dims) != len(sample) or any(isinstance(d, int) and d != s for d, s in zip(dims, sample, strict=True)):
        raise ki.ModelProblem(f"model {name}: golden inputs {list(golden.x.shape)} do not fit the model input "
                              f"{model.shape_text()}")
    return golden.x.astype(model.input_dtype)


# -- comparing outputs ----------------------------------------------------------------------------


def compare_samples(got: list[np.ndarray], golden: Golden) -> dict[str, Any]:
    """Format 2: max abs diff per sample (and top-1 per sample when the golden set asks for it)."""
    n = golden.count
    per_sample, mismatched = [], []
    for i, (g, (_, want)) in enumerate(zip(got, golden.samples, strict=True)):
        if g.shape != want.shape:
            return {"ok": False, "samples": n, "error": f"sample {i}: output shape {list(g.shape)}, golden "
                                                        f"{list(want.shape)}"}
        d = np.abs(g.astype(np.float64) - want.astype(np.float64))
        per_sample.append(float(np.where(np.isfinite(d), d, np.inf).max()) if d.size else 0.0)
        if golden.argmax and int(g.reshape(-1).argmax()) != int(want.reshape(-1).argmax()):
            mismatched.append(i)
    worst = int(np.argmax(per_sample))
    finite = bool(np.isfinite(per_sample[worst]))
    return {"ok": bool(finite and per_sample[worst] <= golden.tolerance and not mismatched), "samples": n,
            "argmax": golden.argmax,
            "tolerance": golden.tolerance, "max_abs_diff": per_sample[worst] if finite else None,
            "worst_sample": worst, "argmax_mismatches": len(mismatched), "mismatched_samples": mismatched[:MAX_SHOWN]}


def compare(got: np.ndarray, golden: Golden, got_argmax: np.ndarray | None = None) -> dict[str, Any]:
    """Max abs diff (and its sample) and argmax agreement against the golden outputs."""
    n = len(golden.outputs)
    expected = golden.outputs.reshape(n, -1).astype(np.float64)
    if got.shape != golden.outputs.shape:
        return {"ok": False, "samples": n, "error": f"output shape {list(got.shape)}, golden "
                                                    f"{list(golden.outputs.shape)}"}
    diff = np.abs(got.reshape(n, -1).astype(np.float64) - expected)
    per_sample = np.where(np.isfinite(diff), diff, np.inf).max(axis=1)
    worst = int(np.argmax(per_sample))
    want = expected.argmax(axis=1)
    have = got_argmax if got_argmax is not None else got.reshape(n, -1).argmax(axis=1)
    mismatched = np.flatnonzero(np.asarray(have).reshape(-1) != want)
    finite = bool(np.isfinite(per_sample[worst]))
    result: dict[str, Any] = {
        "ok": bool(finite and per_sample[worst] <= golden.tolerance and len(mismatched) == 0),
        "samples": n, "tolerance": golden.tolerance,
        "max_abs_diff": float(per_sample[worst]) if finite else None,
        "worst_sample": worst, "worst_expected_argmax": int(want[worst]),
        "worst_argmax": int(np.asarray(have).reshape(-1)[worst]),
        "argmax_mismatches": len(mismatched), "mismatched_samples": mismatched[:MAX_SHOWN].tolist(),
    }
    if len(golden.labels) == n:
        result["label_accuracy"] = float(np.mean(np.asarray(have).reshape(-1) == golden.labels))
    return result


def wrong_outputs(where: str, c: dict[str, Any]) -> str:
    if "error" in c:
        return f"{where}: {c['error']}"
    diff = "non-finite" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.3g}"
    text = f"{where}: outputs differ from the golden set: max |diff| {diff} at sample {c['worst_sample']} "
    if "worst_expected_argmax" in c:
        text += (f"(tolerance {c['tolerance']:g}; expected class {c['worst_expected_argmax']}, "
                 f"got {c['worst_argmax']})")
    else:
        text += f"(tolerance {c['tolerance']:g})"
    if c["argmax_mismatches"]:
        shown = ", ".join(map(str, c["mismatched_samples"]))
        text += f"; argmax differs on {c['argmax_mismatches']}/{c['samples']} samples (first: {shown})"
    return text


# -- latency ----------------------------------------------------------------------------------


def measure(model: ki.LoadedModel, x: np.ndarray | list[np.ndarray], runs: int,
            budget_s: float | None = None) -> dict[str, Any]:
    """p50/p95/max of single-sample inferences (a fixed-batch model gets one sample repeated).

    With `budget_s`, warm-up stops after a quarter of it, and timing once that many seconds have
    gone and MIN_BUDGET_RUNS are done: a heavy model (a detector on a slow CPU) is not timed 200
    times at boot."""
    batch = model.fixed_batch or 1
    if isinstance(x, list):  # golden format 2: each sample as stored
        samples = [s.astype(model.input_dtype) for s in x]
    else:
        samples = [np.repeat(x[i][None], batch, axis=0) for i in range(len(x))]
    began = time.monotonic()
    for i in range(WARMUP_RUNS):
        model.run(samples[i % len(samples)])
        if budget_s is not None and time.monotonic() - began > budget_s / 4:
            break
    times = np.empty(runs)
    began = time.monotonic()
    done = runs
    for i in range(runs):
        sample = samples[i % len(samples)]
        start = time.perf_counter()
        model.run(sample)
        times[i] = (time.perf_counter() - start) * 1e3
        if budget_s is not None and i + 1 >= MIN_BUDGET_RUNS and time.monotonic() - began > budget_s:
            done = i + 1
            break
    times = times[:done]
    p50, p95 = np.percentile(times, [50, 95])
    return {"runs": done, "threads": 1, "p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4),
            "max_ms": round(float(times.max()), 4)}


# -- in process --------------------------------------------------------------------------------


@dataclass
class Checked:
    entry: ki.ModelEntry
    golden: Golden
    x: np.ndarray
    fixed_batch: int | None


def check_model(entry: ki.ModelEntry, providers: list[str], envelope: float | None, runs: int,
                problems: list[Problem],
                release: Release | None = None,
                fallback: dm.Fallback | None = None,
                budget_s: float | None = None,
                settle: Callable[[], None] | None = None) -> tuple[dict[str, Any], Checked | None]:
    info: dict[str, Any] = entry.describe()
    try:
        ki.verify_digest(entry)
        golden = load_golden(entry)
        model = ki.load_model(entry, providers, threads=1, release=release)  # OpenVINO: device, precision
        x = check_fits(model, golden)
        sampled = [s.astype(model.input_dtype) for s, _ in golden.samples]
        got = [model.run(s) for s in sampled] if golden.samples else model.run_all(x)
    except ki.ModelProblem as exc:
        problems.append(Problem(BROKEN, entry.name, str(exc)))
        return info, None
    except Exception as exc:  # onnxruntime failing at run time on a model that loaded
        problems.append(Problem(BROKEN, entry.name, f"model {entry.name}: inference failed: {first_line(exc)}"))
        return info, None
    info.update(golden=golden.path, providers=model.session.get_providers(), **ki.openvino_device(model),
                load_ms=round(model.load_ms, 3))
    info["local"] = compare_samples(got, golden) if isinstance(got, list) else compare(got, golden)
    if not info["local"]["ok"]:
        problems.append(Problem(WRONG, entry.name, wrong_outputs(f"{entry.name} {entry.version}", info["local"])))
    which = "class"
    if entry.p95_latency_ms is not None:
        envelope, which = entry.p95_latency_ms, "model"
    if model.degraded_reason is not None:
        info["degraded_reason"] = model.degraded_reason
        if fallback is not None and fallback.degrades:
            envelope = (entry.fallback_p95_latency_ms or fallback.p95_latency_ms or entry.p95_latency_ms
                        or envelope)
            which = "degraded"
        else:
            problems.append(Problem(ACCELERATOR, entry.name, f"{entry.name} {entry.version}: "
                                    f"{model.degraded_reason}; the class's fallback policy is fail"))
    if settle is not None:
        settle()
    info["latency"] = {"started_at": ki.now_iso(), **measure(model, sampled or x, runs, budget_s),
                       "envelope_p95_ms": envelope,
                       "envelope": which}
    if envelope is not None and info["latency"]["p95_ms"] > envelope:
        problems.append(Problem(SLOW, entry.name, f"{entry.name} {entry.version}: p95 latency "
                                f"{info['latency']['p95_ms']:.4g} ms over the {which} envelope {envelope:g} ms "
                                f"({info['latency']['runs']} single-sample runs, 1 thread)"))
    return info, Checked(entry, golden, x, model.fixed_batch)


# -- via the service ----------------------------------------------------------------------------

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never via a proxy


def http_json(url: str, payload: object | None, timeout: float) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})  # noqa: S310 - http(s) only, checked in parse_args
    try:
        with OPENER.open(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()[:300]
        raise ServiceError(f"{url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServiceError(f"{url} unreachable: {getattr(exc, 'reason', exc)}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise ServiceError(f"{url}: the reply is not JSON") from None


def service_gave_up(root: Path) -> str | None:
    """Why the inference service said, during this boot, that it will not serve (contract.ACCELERATOR_STATE
    `failed`: its accelerator is unavailable under policy fail); None while it has not."""
    try:
        state = json.loads(under(root, ACCELERATOR_STATE).read_text())
    except (OSError, ValueError):
        return None
    boot = dm.read_boot_id(root)
    if not isinstance(state, dict) or not state.get("failed") or boot is None or state.get("boot_id") != boot:
        return None
    return str(state["failed"])


def wait_ready(base: str, wait: float, timeout: float,
               gave_up: Callable[[], str | None] | None = None) -> dict[str, Any]:
    """/healthz once the service answers, for up to WAIT seconds; at once when GAVE_UP says it never will."""
    deadline = time.monotonic() + wait
    while True:
        try:
            listing = http_json(f"{base}/healthz", None, timeout)
        except ServiceError:
            why = gave_up() if gave_up else None
            if why is not None:
                raise ServiceError(f"{base} will not serve this boot ({ACCELERATOR_STATE}): {why}") from None
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.25)
            continue
        if not isinstance(listing, dict) or not isinstance(listing.get("models"), list):
            raise ServiceError(f"{base}/healthz: unexpected reply")
        return listing


def infer_samples_via(base: str, c: Checked, timeout: float) -> list[np.ndarray]:
    """Format 2: each golden sample through the service, one request each."""
    out = []
    for x, _ in c.golden.samples:
        reply = http_json(f"{base}/v1/models/{c.entry.name}/infer", {"inputs": x.tolist()}, timeout)
        try:
            out.append(np.asarray(reply["outputs"], dtype=np.float64))
        except (KeyError, TypeError, ValueError):
            raise ServiceError(f"{base}: malformed inference reply for {c.entry.name}") from None
    return out


def infer_via(base: str, c: Checked, timeout: float) -> tuple[np.ndarray, np.ndarray]:
    outputs, argmax = [], []
    for chunk, n in ki.batches(c.x, c.fixed_batch):
        reply = http_json(f"{base}/v1/models/{c.entry.name}/infer", {"inputs": chunk.tolist()}, timeout)
        try:
            outputs.append(np.asarray(reply["outputs"], dtype=np.float64)[:n])
            argmax.append(np.asarray(reply["argmax"], dtype=np.int64)[:n])
        except (KeyError, TypeError, ValueError):
            raise ServiceError(f"{base}: malformed inference reply for {c.entry.name}") from None
    return np.concatenate(outputs), np.concatenate(argmax)


def check_service(base: str, checked: list[Checked], infos: dict[str, dict[str, Any]], wait: float,
                  timeout: float, problems: list[Problem],
                  gave_up: Callable[[], str | None] | None = None) -> dict[str, Any]:
    try:
        listing = wait_ready(base, wait, timeout, gave_up)
    except ServiceError as exc:
        problems.append(Problem(SERVICE, None, f"inference service: {exc}"))
        return {"url": base, "reachable": False}
    served = {m.get("name"): m for m in listing["models"] if isinstance(m, dict)}
    for c in checked:
        e = c.entry
        sha = (served.get(e.name) or {}).get("sha256")
        if sha != e.sha256:
            what = "does not serve it" if sha is None else f"serves sha256 {sha}, release.json says {e.sha256}"
            problems.append(Problem(SERVICE, e.name, f"inference service at {base}: model {e.name}: {what}"))
            continue
        try:
            if c.golden.samples:
                result = compare_samples(infer_samples_via(base, c, timeout), c.golden)
            else:
                got, argmax = infer_via(base, c, timeout)
                result = compare(got, c.golden, argmax)
        except ServiceError as exc:
            problems.append(Problem(SERVICE, e.name, f"inference service: {exc}"))
            continue
        infos[e.name]["service"] = result
        if not result["ok"]:
            problems.append(Problem(WRONG, e.name, wrong_outputs(f"{e.name} {e.version} via {base}", result)))
    return {"url": base, "reachable": True}


# -- main ---------------------------------------------------------------------------------------


def run_checks(args: argparse.Namespace) -> dict[str, Any]:
    problems: list[Problem] = []
    infos: dict[str, dict[str, Any]] = {}
    checked: list[Checked] = []
    result: dict[str, Any] = {"checked_at": ki.now_iso(), "root": str(args.root)}
    try:
        release = ki.load_release(args.root)
        entries = ki.model_entries(release, args.root)
        providers = ki.choose_providers(release)
        envelope = release.p95_latency_ms
        fallback = ki.fallback_policy(release)
    except ki.ModelProblem as exc:
        problems.append(Problem(BROKEN, None, str(exc)))
        entries, providers, envelope, fallback = [], [], None, None
        release = None
    result.update({"class": release.cls if release else None, "version": release.version if release else None,
                   "envelope_p95_ms": envelope})
    deadline: list[float] = []  # when --wait runs out, from the first time the check needs the service

    def gave_up() -> str | None:  # a service that will not serve is not waited for (policy fail: exit 4)
        return service_gave_up(args.root)

    def settle() -> None:
        """With --service, time the models only once the service answers (or --wait has run out): at boot
        the check starts beside the service, whose loading would compete with the timing for the CPUs."""
        if args.service and not deadline:
            deadline.append(time.monotonic() + args.wait)
            with contextlib.suppress(ServiceError):
                wait_ready(args.service, args.wait, args.timeout, gave_up)

    for entry in entries:
        infos[entry.name], ok = check_model(entry, providers, envelope, args.runs, problems, release, fallback,
                                            args.seconds, settle)
        checked += [ok] if ok else []
    reason = next((i["degraded_reason"] for i in infos.values() if i.get("degraded_reason")), None)
    degrades = reason is not None and fallback is not None and fallback.degrades
    result.update(dm.state(degrades, reason, args.root), policy=fallback.policy if fallback else None)
    if degrades and fallback is not None:
        result["envelope_p95_ms"] = fallback.p95_latency_ms or envelope
    if args.service:
        wait = max(0.0, deadline[0] - time.monotonic()) if deadline else args.wait  # both waits together
        result["service"] = check_service(args.service, checked, infos, wait, args.timeout, problems, gave_up)
    code = next((c for c in PRECEDENCE if any(p.code == c for p in problems)), HEALTHY)
    status = DEGRADED if code == HEALTHY and result["degraded"] else NAMES[code]
    return {**result, "exit_code": code, "status": status, "healthy": code == HEALTHY,
            "models": list(infos.values()), "problems": [asdict(p) for p in problems]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="kiln-health-inference", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, usage_code=USAGE)
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="tree holding usr/lib/kiln/release.json and the models (default /)")
    parser.add_argument("--service", metavar="URL",
                        help=f"also check the running service, e.g. http://{ki.HOST}:{ki.DEFAULT_PORT}")
    parser.add_argument("--wait", type=float, default=5.0,
                        help="seconds to wait for the service to answer /healthz, counted from when the models "
                             "are loaded here: they are timed once it answers (default 5)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default 10)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed single-sample runs per model for the p95 (default {DEFAULT_RUNS}, "
                             f"at least {MIN_RUNS})")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"stop timing a model after this many seconds once {MIN_BUDGET_RUNS} runs are done "
                             f"(default {DEFAULT_SECONDS:g})")
    parser.add_argument("--output", type=Path, default=None, help=f"result file (default ROOT/{HEALTH})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: not a directory")
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS} for a meaningful p95")
    if args.wait < 0 or args.timeout <= 0:
        parser.error("--wait must be >= 0 and --timeout > 0")
    if args.service is not None:
        if not args.service.startswith(("http://", "https://")):
            parser.error(f"--service {args.service!r}: expected an http:// URL")
        args.service = args.service.rstrip("/")
    args.output = args.output or under(args.root, HEALTH)
    return args


def summary(c: dict[str, Any]) -> str:
    diff = "non-finite" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.2g}"
    text = f"{c['samples']} golden samples, max |diff| {diff} (tolerance {c['tolerance']:g})"
    if c.get("argmax", True):
        text += f", argmax {c['samples'] - c['argmax_mismatches']}/{c['samples']}"
    return text


def report(result: dict[str, Any]) -> None:
    for m in result["models"]:
        local, lat = m.get("local"), m.get("latency")
        if local and lat and "error" not in local:
            envelope = lat.get("envelope_p95_ms")
            which = "degraded envelope" if lat.get("envelope") == "degraded" else "envelope"
            limit = "no envelope" if envelope is None else f"{which} {envelope:g} ms"
            say(f"{m['name']} {m['version']}: {summary(local)}; p95 {lat['p95_ms']:.3g} ms "
                f"({limit}, {lat['runs']} runs, 1 thread)")
        if "error" not in m.get("service", {"error": None}):
            say(f"{m['name']} {m['version']} via {result['service']['url']}: {summary(m['service'])}")
    if result.get("degraded"):
        say(f"degraded: {result['degraded_reason']} (the class's fallback policy is degrade)")
    for p in result["problems"]:
        say(f"FAIL ({p['code']} {NAMES[p['code']]}): {p['message']}")
    say(f"{result['status']} (exit {result['exit_code']}, {result['duration_s']:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    result = run_checks(args)
    result["duration_s"] = round(time.perf_counter() - start, 3)
    try:
        write_json_atomic(args.output, result, default=ki.plain)
    except OSError as exc:
        say(f"warning: cannot write {args.output}: {first_line(exc)}")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=ki.plain))
    report(result)
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
