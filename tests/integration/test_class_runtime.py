"""The model gate measures intel-lowpower-detector's candidates under its own runtime, onnxruntime-openvino.

Real wheels: the first run downloads the class's wheelhouse from PyPI (~85 MB) into Kiln's state
directory and makes the runtime venv there (.kiln/runtimes/<key>/); later runs reuse both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from builder import paths
from builder.loader import load_class
from builder.model import format_table, read_report
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

CLASS = "intel-lowpower-detector"
OV_CPU = "OpenVINOExecutionProvider(CPU)"


def test_kiln_model_optimize_gates_on_the_openvino_ep() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KILN_QUIET"}
    r = subprocess.run([sys.executable, "-m", "builder.cli", "model", "optimize", CLASS],
                       capture_output=True, text=True, cwd=ROOT, env={**env, "COLUMNS": "250"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "runtime_worker.py" in r.stderr  # measured in the runtime venv's python, through run()
    shown = " ".join(r.stdout.split())  # the rich table's caption wraps with the terminal
    assert f"fp16 @ {OV_CPU}" in shown and "fp16 @ CPUExecutionProvider" in shown
    assert f"gated on {OV_CPU} (onnxruntime-openvino 1.24.1)" in shown
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
