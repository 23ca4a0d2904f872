"""The model gate measures intel-lowpower-detector's candidates under its own runtime, onnxruntime-openvino.

Real wheels: the first run downloads the class's wheelhouse from PyPI (~85 MB) into Kiln's state
directory and makes the runtime venv there (.kiln/runtimes/<key>/); later runs reuse both.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from builder.core import paths
from builder.model.report import format_table, read_report
from builder.spec.loader import load_class
from tests.conftest import ROOT, run_log

pytestmark = pytest.mark.integration

CLASS = "intel-lowpower-detector"
OV_CPU = "OpenVINOExecutionProvider(CPU)"


def test_kiln_model_optimize_gates_on_the_openvino_ep() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KILN_QUIET"}
    r = subprocess.run([sys.executable, "-m", "builder.cli", "model", "optimize", CLASS],
                       capture_output=True, text=True, cwd=ROOT, env={**env, "COLUMNS": "250"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "runtime_worker.py" in run_log(r.stderr)  # measured in the runtime venv's python
    shown = " ".join(r.stdout.split())  # the rich table's caption wraps with the terminal
    assert f"fp16 @ {OV_CPU}" in shown and "fp16 @ CPUExecutionProvider" in shown
    assert f"gated on {OV_CPU} on {platform.machine()} (onnxruntime-openvino 1.24.1)" in shown
    assert "OpenVINO device GPU is not available on this host: measured on its CPU device" in shown

    hc = load_class(CLASS, ROOT / "images")
    m = hc.spec.models[0]
    report = read_report(paths.model_dir(CLASS, m.name, m.version) / "report.json")
    assert report.chosen == "fp16"
    rt = report.runtime
    assert (rt["name"], rt["version"], rt["measured_with"]) == ("onnxruntime-openvino", "1.24.1", OV_CPU)
    assert rt["session_providers"][0] == "OpenVINOExecutionProvider"
    assert rt["provider_options"]["OpenVINOExecutionProvider"] == {
        "device_type": "CPU", "precision": "FP32", "num_of_threads": "1"}
    fp16 = report.candidate("fp16")
    assert fp16.runtime == OV_CPU and fp16.gated and fp16.passed
    # The golden check's tolerance holds for OpenVINO's CPU device against the host's outputs.
    assert fp16.max_abs_diff is not None and fp16.max_abs_diff < 1e-4
    assert any(g.gate == "golden_tolerance" and g.passed for g in fp16.gates)
    assert fp16.accuracy is not None and fp16.accuracy >= 0.97
    (ref,) = [c for c in report.reference if c.name == "fp16"]
    assert ref.runtime == "CPUExecutionProvider" and not ref.gated
    text = format_table(report)
    assert any(ln.startswith("*") and f"fp16 @ {OV_CPU}" in ln for ln in text.splitlines())
    assert "reference (not gated)" in text
    golden = np.load(paths.model_dir(CLASS, m.name, m.version) / "golden.npz")
    assert float(golden["tolerance"]) == m.validation.golden_tolerance


def test_the_device_runs_openvino_on_its_cpu_device_when_the_igpu_is_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kiln_device.inference under the class's own runtime (onnxruntime-openvino, its venv) on a host
    without an iGPU, as the image boots in QEMU: asked for OpenVINO's GPU device, onnxruntime falls
    back to its plain CPU provider; the device retries OpenVINO's CPU device and says it is degraded."""
    from builder.core.context import make_context
    from builder.model.runtime_venv import make_runtime_venv

    state = make_context().state
    python = make_runtime_venv(load_class(CLASS, ROOT / "images"), state, f"images/{CLASS}.yaml")
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from kiln_device import inference as ki\n"
        "from kiln_device.contract import parse_release\n"
        "release = parse_release({'class': 'x', 'compatible': 'kiln,x', 'version': '1.0.0',\n"
        "                         'runtime': {'name': 'onnxruntime-openvino', 'version': '1.24.1', 'device': 'GPU',\n"
        "           'executionProviders': ['OpenVINOExecutionProvider', 'CPUExecutionProvider']}})\n"
        f"entry = ki.ModelEntry(name='digits', version='1.0.0', precision='fp16', sha256='', path='x',\n"
        f"                      file=Path({str(ROOT / 'models/digits/digits.onnx')!r}))\n"
        "m = ki.load_model(entry, ['OpenVINOExecutionProvider', 'CPUExecutionProvider'], 1, release=release)\n"
        "print(json.dumps({'providers': m.session.get_providers(), 'reason': m.degraded_reason,\n"
        "                  'openvino': m.openvino}))\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")}
    r = subprocess.run([str(python), str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["providers"][0] == "OpenVINOExecutionProvider"
    assert out["openvino"]["device_type"] == "CPU" and out["openvino"]["precision"] == "FP32"
    assert out["reason"] == ("OpenVINOExecutionProvider device GPU unavailable; "
                             "running on OpenVINOExecutionProvider (CPU device)")
