"""The device's inference service and golden health check, run for real on a temp rootfs.

The tree is laid out like an image: /usr/lib/kiln/release.json, the digits model
optimized by builder.model.optimize_model with its report and golden set under
/usr/share/kiln/models/digits/1.0.0/, the common overlay with the kiln_device package
copied in as images carry it, and a venv shim at /usr/lib/kiln/venv/bin/python that
runs this interpreter (onnxruntime, numpy).
The device code runs as subprocesses, the way its units start it.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.core.files import sha256_file
from builder.image.render import make_device_package
from builder.model.pipeline import optimize_model
from builder.model.policy import Gates, OptimizationPolicy
from kiln_device import contract

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models/digits"
MODEL_DIR = "usr/share/kiln/models/digits/1.0.0"
LAUNCHER = contract.LAUNCHER.lstrip("/")
HEALTH = "usr/libexec/kiln/kiln-health-inference"
STATUS = "var/lib/kiln/inference/status.json"
RESULT = "var/lib/kiln/health/inference.json"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chosen.onnx, report.json and golden.npz, as `kiln model optimize` makes them (FP32 only: fast)."""
    out = tmp_path_factory.mktemp("digits-optimized")
    optimize_model(DIGITS / "digits.onnx", DIGITS / "data/calibration.npz", DIGITS / "data/validation.npz",
                   OptimizationPolicy(candidates=(), latency_runs=10, golden_count=32), Gates(), out)
    return out


def make_rootfs(root: Path, artifacts: Path, *, model: Path | None = None, envelope: float = 50.0) -> Path:
    shutil.copytree(ROOT / "overlays/common/usr", root / "usr", symlinks=True)
    make_device_package(contract.under(root, contract.PYTHON_DIR) / "kiln_device")
    shim = root / "usr/lib/kiln/venv/bin/python"
    shim.parent.mkdir(parents=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    d = root / MODEL_DIR
    d.mkdir(parents=True)
    shutil.copyfile(model or artifacts / "chosen.onnx", d / "model.onnx")
    for name in ("golden.npz", "report.json"):
        shutil.copyfile(artifacts / name, d / name)
    release = {
        "class": "qemu-x86_64", "compatible": "kiln,qemu-x86_64", "version": "1.0.0", "p95LatencyMs": envelope,
        "runtime": {"name": "onnxruntime", "version": "1.20.0", "executionProviders": ["CPUExecutionProvider"]},
        "models": [{"name": "digits", "version": "1.0.0", "precision": "fp32",
                    "sha256": sha256_file(d / "model.onnx"), "path": f"/{MODEL_DIR}/model.onnx"}],
    }
    (root / "usr/lib/kiln/release.json").write_text(json.dumps(release, indent=2))
    return root


@pytest.fixture
def rootfs(tmp_path: Path, artifacts: Path) -> Path:
    return make_rootfs(tmp_path / "root", artifacts)


def golden(root: Path) -> dict[str, np.ndarray]:
    with np.load(root / MODEL_DIR / "golden.npz") as npz:
        return {k: npz[k] for k in npz.files}


def permuted_model(dst: Path) -> Path:
    """The digits model with its last layer's rows rotated: loads fine, answers wrong."""
    model = onnx.load(str(DIGITS / "digits.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for name in last.input[1:3]:  # weight [10, 32] (transB) and bias [10]
        rows = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array(np.roll(rows, 1, axis=0), name))
    onnx.save(model, str(dst))
    return dst


# -- plumbing ----------------------------------------------------------------------------------


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Service:
    proc: subprocess.Popen[str]
    url: str
    status: Path


@contextmanager
def start_service(root: Path, port: int = 0) -> Iterator[Service]:
    status = root / STATUS
    proc = subprocess.Popen([str(root / "usr/lib/kiln/venv/bin/python"), "-I", str(root / LAUNCHER), "kiln-inference",
                             "--root", str(root), "--port", str(port), "--status-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ready() -> int | bool:
        state = read_json(status)
        return proc.poll() is not None or (bool(state.get("ready")) and int(state["port"]))

    try:
        port = wait_for("the service to be ready", ready)
        assert proc.poll() is None, proc.communicate()[0]
        yield Service(proc, f"http://127.0.0.1:{port}", status)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def http(url: str, payload: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
    try:
        with OPENER.open(urllib.request.Request(url, data=data), timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(root: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run the check through its shell wrapper, as the unit does; (exit code, --json result, stderr)."""
    r = subprocess.run([str(root / HEALTH), "--json", "--runs", "200", *args],
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout) if r.stdout else {}, r.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the service -----------------------------------------------------------------------------


def test_service_serves_the_model_and_records_status(rootfs: Path) -> None:
    g = golden(rootfs)
    expected = g["outputs"].argmax(axis=1)
    with start_service(rootfs) as svc:
        code, listing = http(f"{svc.url}/healthz")
        assert code == 200 and listing["ready"]
        release = json.loads((rootfs / "usr/lib/kiln/release.json").read_text())
        assert [(m["name"], m["sha256"]) for m in listing["models"]] == [("digits", release["models"][0]["sha256"])]
        assert listing["models"][0]["input_shape"] == "[N, 1, 8, 8]"

        infer = f"{svc.url}/v1/models/digits/infer"
        code, out = http(infer, {"inputs": g["x"].tolist()})
        assert code == 200 and out["version"] == "1.0.0"
        assert np.abs(np.asarray(out["outputs"]) - g["outputs"]).max() <= float(g["tolerance"])
        assert out["argmax"] == expected.tolist()
        known = np.flatnonzero(expected == g["labels"])  # samples the model gets right
        assert len(known) >= 30
        assert [out["argmax"][i] for i in known] == g["labels"][known].tolist()
        code, one = http(infer, {"inputs": g["x"][known[:1]].tolist()})
        assert code == 200 and one["argmax"] == [int(g["labels"][known[0]])]

        code, err = http(infer, raw=b"{not json")
        assert code == 400 and "not valid JSON" in err["error"]
        code, err = http(infer, {"inputs": g["x"][0].tolist()})  # no batch dimension
        assert code == 400 and "expects [N, 1, 8, 8]" in err["error"] and "[1, 8, 8]" in err["error"]
        code, err = http(infer, {"inputs": [[1, 2], [3]]})
        assert code == 400 and "rectangular" in err["error"]
        code, err = http(f"{svc.url}/v1/models/cats/infer", {"inputs": []})
        assert code == 404 and "unknown model 'cats'" in err["error"] and "digits" in err["error"]

        status = wait_for("the status file to count 6 requests",
                          lambda: (s := read_json(svc.status)).get("requests") == 6 and s)
        assert (status["successes"], status["errors"]) == (2, 4)
        assert status["by_model"]["digits"] == {"requests": 5, "errors": 3,
                                                "last_success_at": status["last_success_at"]}
        assert status["last_success_at"] and status["started_at"] <= status["last_success_at"]
        assert status["last_error"]["status"] == 404 and "cats" in status["last_error"]["message"]
        latency = status["latencyMs"]  # of the 2 successful requests: what the agent reports to the fleet
        assert latency["window"] == 2 and 0 < latency["p50"] <= latency["p95"] <= latency["p99"] < 10_000
        assert [(m["name"], m["version"], m["sha256"]) for m in status["models"]] == [
            ("digits", "1.0.0", release["models"][0]["sha256"])]
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=10) == 0
    assert read_json(svc.status)["ready"] is False
    assert not list(svc.status.parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_service_refuses_a_tampered_model(rootfs: Path) -> None:
    with (rootfs / MODEL_DIR / "model.onnx").open("ab") as f:
        f.write(b"\0")
    r = subprocess.run([str(rootfs / "usr/lib/kiln/venv/bin/python"), "-I", str(rootfs / LAUNCHER), "kiln-inference",
                        "--root", str(rootfs), "--port", "0"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stderr
    assert "sha256" in r.stderr and "refusing a modified model" in r.stderr and "Traceback" not in r.stderr
    status = read_json(rootfs / STATUS)
    assert status["ready"] is False and "refusing a modified model" in status["last_error"]["message"]


# -- the health check --------------------------------------------------------------------------


def test_health_check_passes_in_process_and_via_the_service(rootfs: Path) -> None:
    with start_service(rootfs) as svc:
        code, result, err = health(rootfs, "--service", svc.url)
    assert code == 0, err
    assert result["healthy"] and result["problems"] == [] and result["service"]["reachable"]
    (m,) = result["models"]
    assert m["local"]["ok"] and m["local"]["argmax_mismatches"] == 0 and m["local"]["samples"] == 32
    assert m["service"]["ok"] and m["service"]["max_abs_diff"] <= m["service"]["tolerance"]
    assert m["latency"]["runs"] == 200 and 0 < m["latency"]["p50_ms"] <= m["latency"]["p95_ms"] <= 50
    assert read_json(rootfs / RESULT) == result  # the last result, for the agent
    assert "healthy (exit 0" in err


def test_health_check_started_beside_the_service_times_the_model_once_it_answers(rootfs: Path) -> None:
    """At boot the check starts beside the service (kiln-health-inference.service): it loads and checks
    the model in process, then waits for the service before it times the model, so the timing does not
    compete with the service's own load for the CPUs."""
    with socket.socket() as listener:  # the port answers nothing yet: the check's first try shows it waiting
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        check = subprocess.Popen([str(rootfs / HEALTH), "--json", "--runs", "200", "--service",
                                  f"http://127.0.0.1:{port}", "--wait", "60", "--timeout", "2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        listener.settimeout(60)
        conn, _ = listener.accept()
        waiting_since = datetime.now(UTC)
        conn.close()
    with start_service(rootfs, port):
        out, err = check.communicate(timeout=60)
    assert check.returncode == 0, err
    (m,) = json.loads(out)["models"]
    assert m["local"]["ok"] and m["service"]["ok"]
    assert datetime.fromisoformat(m["latency"]["started_at"].replace("Z", "+00:00")) > waiting_since


def test_health_check_catches_wrong_outputs(tmp_path: Path, artifacts: Path) -> None:
    root = make_rootfs(tmp_path / "root", artifacts, model=permuted_model(tmp_path / "wrong.onnx"))
    code, result, err = health(root)
    assert code == 1, err
    (problem,) = result["problems"]
    assert problem["code"] == 1 and "outputs differ from the golden set" in problem["message"]
    assert "argmax differs on 32/32 samples" in problem["message"] and "at sample" in problem["message"]
    assert result["models"][0]["local"]["max_abs_diff"] > 0.001


def test_health_check_catches_a_slow_model(tmp_path: Path, artifacts: Path) -> None:
    root = make_rootfs(tmp_path / "root", artifacts, envelope=0.000001)
    code, result, err = health(root)
    assert code == 2, err
    assert [p["code"] for p in result["problems"]] == [2]
    assert "over the class envelope 1e-06 ms" in result["problems"][0]["message"]
    assert result["models"][0]["local"]["ok"]


@pytest.mark.parametrize("damage", ["tampered-model", "missing-golden", "corrupt-golden"])
def test_health_check_refuses_a_broken_model_or_golden_set(rootfs: Path, damage: str) -> None:
    d = rootfs / MODEL_DIR
    if damage == "tampered-model":
        data = bytearray((d / "model.onnx").read_bytes())
        data[-1] ^= 0xFF
        (d / "model.onnx").write_bytes(bytes(data))
    elif damage == "missing-golden":
        (d / "golden.npz").unlink()
    else:
        (d / "golden.npz").write_bytes((d / "golden.npz").read_bytes()[:100])
    code, result, err = health(rootfs)
    assert code == 3, err
    message = result["problems"][0]["message"]
    expected = {"tampered-model": "refusing a modified model", "missing-golden": "golden.npz is missing",
                "corrupt-golden": "golden.npz is unreadable"}[damage]
    assert expected in message and expected in err


def test_health_check_reports_an_unreachable_service(rootfs: Path) -> None:
    code, result, err = health(rootfs, "--service", f"http://127.0.0.1:{closed_port()}", "--wait", "0.2")
    assert code == 4, err
    assert result["service"]["reachable"] is False and "unreachable" in result["problems"][0]["message"]
    assert result["models"][0]["local"]["ok"]  # the in-process check still ran


def test_health_check_usage_and_help(rootfs: Path) -> None:
    code, _, err = health(rootfs, "--runs", "5")
    assert code == 64 and "--runs must be at least" in err
    r = subprocess.run([str(rootfs / HEALTH), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for line in ("0   healthy", "1   outputs wrong", "2   too slow", "3   model or golden set missing",
                 "4   service unreachable", "64  usage"):
        assert line in r.stdout
