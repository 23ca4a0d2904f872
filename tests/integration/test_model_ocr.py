"""The model gate on a real pretrained detector: PP-OCRv4's text detector from the
rapidocr-onnxruntime wheel (downloaded once, pinned by sha256), scikit-image's page photograph
and hand-written line boxes (models/ocr). Real onnxruntime throughout; the device's golden
check (kiln_device.health, format 2) replays the shipped golden set, in process and through the
inference service.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from builder.core.errors import ModelError
from builder.model.data import load_dataset
from builder.model.fetch import ensure_source
from builder.model.optimize import quantized_nodes
from builder.model.pipeline import optimize_model
from builder.model.policy import Gates, OptimizationPolicy
from builder.model.report import read_report
from builder.spec.loader import load_class
from tests.integration.test_device_inference import MODEL_DIR, health, make_rootfs, start_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "models/ocr/data"
POST = {"threshold": 0.3, "box_threshold": 0.5, "min_size": 3, "unclip_ratio": 1.0, "iou": 0.5}


@pytest.fixture(scope="module")
def detector() -> Path:
    """The model file as the intel-lowpower-detector spec fetches it."""
    hc = load_class("intel-lowpower-detector", ROOT / "images")
    (m,) = [m for m in hc.spec.models if m.name == "text-detector"]
    return ensure_source(m)


def policy(**more: Any) -> OptimizationPolicy:
    base: dict[str, Any] = {"task": "detection", "postprocess": POST, "latency_runs": 20,
                            "candidates": ("int8-static", "int8-mixed"), "mixed_max_nodes": 2, "golden_count": 2,
                            "golden_tolerance": 0.02}
    return OptimizationPolicy(**{**base, **more})


GATES = Gates(min_accuracy=0.8, max_accuracy_drop=0.02, fidelity={"*": {"min_cosine": 0.99}})


@pytest.fixture(scope="module")
def optimized(detector: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("det")
    optimize_model(detector, DATA / "det-calibration", DATA / "det-validation", policy(), GATES, out)
    return out


def test_the_fetched_model_is_the_pinned_wheels(detector: Path) -> None:
    model = onnx.load(str(detector))
    assert [i.name for i in model.graph.input] == ["x"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_value") for d in dims] == [False, True, False, False]  # N, 3, H, W: dynamic


def test_detector_gets_fidelity_and_detection_metrics_and_keeps_fp32(optimized: Path) -> None:
    report = read_report(optimized / "report.json")
    assert report.task == "detection" and report.score == "f1"
    fp32, int8, mixed = (report.candidate(n) for n in ("fp32", "int8-static", "int8-mixed"))
    # FP32 against the hand-written boxes: 7 lines on each of the page's 4 sizes
    assert fp32.metrics["tp"] + fp32.metrics["fn"] == 28
    assert fp32.accuracy is not None and fp32.accuracy > 0.85
    assert fp32.fidelity["sigmoid_0.tmp_0"]["cosine"] == pytest.approx(1.0)
    for c in (int8, mixed):
        assert c.fidelity["sigmoid_0.tmp_0"]["cosine"] < 0.99
        assert not c.passed and any(g.gate == "min_cosine" and not g.passed for g in c.gates)
    assert report.chosen == "fp32"
    assert any(r.startswith("int8-static refused:") and "cosine to FP32" in r for r in report.reasons)


def test_mixed_precision_names_the_nodes_it_kept_in_fp32(optimized: Path, detector: Path) -> None:
    mixed = read_report(optimized / "report.json").candidate("int8-mixed")
    assert mixed.mixed is not None
    kept = mixed.mixed["kept_fp32"]
    names = {n.name for n in onnx.load(str(detector)).graph.node}
    assert kept and set(kept) <= names  # node names of the source graph
    assert [len(s["nodes"]) for s in mixed.mixed["search"]] == [0, 1, 2]  # plain INT8 first
    # Issue 36, finding 2: only nodes the quantizer quantizes are ranked (Div, ReduceMean, Erf never were, so
    # keeping them in FP32 changed no byte), and each kept node really runs in FP32 in the candidate file.
    static, candidate = (quantized_nodes(optimized / read_report(optimized / "report.json").candidate(n).path)
                         for n in ("int8-static", "int8-mixed"))
    ranked = [n for n, _ in mixed.mixed["sensitivity"]]
    assert ranked and set(ranked) <= static, set(ranked) - static
    assert set(kept) <= static and not set(kept) & candidate
    assert mixed.sha256 != read_report(optimized / "report.json").candidate("int8-static").sha256
    sizes = {n: (optimized / read_report(optimized / "report.json").candidate(n).path).stat().st_size
             for n in ("int8-static", "int8-mixed")}
    assert mixed.mixed["size_cost_bytes"] == sizes["int8-mixed"] - sizes["int8-static"]  # what keeping them costs
    assert mixed.mixed["quantized_nodes"] == len(static)


def test_golden_set_format_2_passes_the_device_check(optimized: Path, tmp_path: Path) -> None:
    with np.load(optimized / "golden.npz") as g:
        assert int(g["format"]) == 2 and int(g["count"]) == 2 and not bool(g["argmax"])
        assert g["x.0"].shape != g["x.1"].shape  # two sizes of the page
    root = make_rootfs(tmp_path / "root", optimized, envelope=5000.0)
    with start_service(root) as svc:
        code, result, err = health(root, "--service", svc.url)
    assert code == 0, err
    (m,) = result["models"]
    assert m["local"]["ok"] and m["local"]["samples"] == 2 and m["service"]["ok"]


def test_a_wrong_golden_output_is_caught(optimized: Path, tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", optimized, envelope=5000.0)
    path = root / MODEL_DIR / "golden.npz"
    with np.load(path) as g:
        arrays = {k: g[k] for k in g.files}
    arrays["outputs.1"] = arrays["outputs.1"] + 0.5
    np.savez(path, **arrays)
    code, result, _ = health(root)
    assert code == 1
    assert "outputs differ from the golden set" in result["problems"][0]["message"]


# -- bad input: located errors ----------------------------------------------------------------------

def copy_dataset(tmp_path: Path, name: str = "det-validation") -> Path:
    d = tmp_path / name
    shutil.copytree(DATA / name, d)
    return d


def edit(d: Path, fn: Any) -> None:
    doc = json.loads((d / "dataset.json").read_text())
    fn(doc)
    (d / "dataset.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(("change", "message"), [
    (lambda doc: doc["samples"][0].update(truth=[[10, 10, 5, 20]]), r"page-96x192\.npz: ground truth .* boxes"),
    (lambda doc: doc["samples"][1].update(truth="text"), r"page-128x288\.npz: ground truth 'text' is not"),
    (lambda doc: doc["samples"][2].pop("truth"), "has no truth while others have"),
    (lambda doc: doc.pop("inputs"), r"input 'x' is uint8 but the model takes float32 \(scale it"),
    (lambda doc: doc["samples"].append({"file": "../x.npz"}), "must be an .npz file in"),
])
def test_bad_ground_truth_or_dataset_is_a_located_model_error(detector: Path, tmp_path: Path, change: Any,
                                                               message: str) -> None:
    d = copy_dataset(tmp_path)
    edit(d, change)
    with pytest.raises(ModelError, match=message):
        optimize_model(detector, DATA / "det-calibration", d, policy(candidates=()), GATES, tmp_path / "out")


def test_samples_that_do_not_fit_the_model_are_refused(detector: Path, tmp_path: Path) -> None:
    d = copy_dataset(tmp_path)
    np.savez(d / "coins.npz", x=np.zeros((1, 1, 64, 64), np.uint8))  # one channel, the model takes 3
    with pytest.raises(ModelError, match=r"coins\.npz: input 'x' has shape \[1, 1, 64, 64\], the model expects"):
        optimize_model(detector, DATA / "det-calibration", d, policy(candidates=()), GATES, tmp_path / "out")


def test_the_metric_must_fit_the_output(detector: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"text-recognition needs ground truth|is not a text"):
        optimize_model(detector, DATA / "det-calibration", DATA / "det-validation",
                       policy(task="text-recognition", candidates=()), GATES, tmp_path / "out")
    with pytest.raises(ModelError, match="the model has no output 'boxes'"):
        optimize_model(detector, DATA / "det-calibration", DATA / "det-validation",
                       policy(postprocess={"output": "boxes"}, candidates=()), GATES, tmp_path / "out")


def test_the_dataset_loads_scaled_as_declared() -> None:
    data = load_dataset(DATA / "det-validation", labels=False)
    assert len(data) == 10 and data.truth is not None and len(data.truth[1]) == 7
    x = data.samples[2]["x"]
    assert x.dtype == np.float32 and x.shape == (1, 3, 192, 384)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


# -- the device holds each model to its own envelope, and bounds the time it spends timing ----------

def set_model_envelope(root: Path, **limits: float) -> None:
    path = root / "usr/lib/kiln/release.json"
    release = json.loads(path.read_text())
    release["models"][0].update(limits)
    path.write_text(json.dumps(release))


def test_the_models_own_envelope_replaces_the_class_one(optimized: Path, tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", optimized, envelope=0.000001)  # the class's: nothing passes
    set_model_envelope(root, p95LatencyMs=5000.0)
    code, result, err = health(root)
    assert code == 0, err
    assert result["models"][0]["latency"]["envelope"] == "model"
    set_model_envelope(root, p95LatencyMs=0.000001)
    code, result, _ = health(root)
    assert code == 2 and "over the model envelope 1e-06 ms" in result["problems"][0]["message"]
    set_model_envelope(root, p95LatencyMs=-1)
    code, result, _ = health(root)
    assert code == 3 and "release.json: models[0].p95LatencyMs: must be above 0, got -1" in \
        result["problems"][0]["message"]


def test_timing_stops_after_the_time_budget(optimized: Path, tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", optimized, envelope=5000.0)
    code, result, err = health(root, "--seconds", "0.01")  # health() asks for 200 runs
    assert code == 0, err
    assert result["models"][0]["latency"]["runs"] == 10  # MIN_BUDGET_RUNS, then the budget was spent


# -- text recognition: PP-OCRv4's recognizer from the same wheel --------------------------------------

@pytest.fixture(scope="module")
def recognizer() -> Path:
    from builder.spec.schema import Model

    models = load_class("intel-lowpower-detector", ROOT / "images").spec.models
    det = next(m for m in models if m.name == "text-detector")
    assert det.fetch is not None
    m = Model.model_validate({
        "name": "text-recognizer", "version": "4.0.0", "source": ".kiln/models/ch_PP-OCRv4_rec_infer.onnx",
        "fetch": {"wheel": det.fetch.wheel, "sha256": det.fetch.sha256,
                  "member": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"},
        "task": "text-recognition", "validation": {"dataset": "models/ocr/data/rec-validation"}})
    return ensure_source(m)


def test_recognizer_character_error_rate_on_the_page_lines(recognizer: Path, tmp_path: Path) -> None:
    report = optimize_model(recognizer, DATA / "rec-calibration", DATA / "rec-validation",
                            OptimizationPolicy(task="text-recognition", candidates=(), latency_runs=5,
                                               golden_count=1, golden_tolerance=0.02),
                            Gates(min_accuracy=0.9), tmp_path)
    fp32 = report.candidate("fp32")
    assert report.score == "char_accuracy" and fp32.passed
    # the hand-typed texts of 21 crops against what the model reads (spaces ignored)
    assert fp32.metrics["cer"] < 0.05 and fp32.metrics["exact"] >= 0.6
    assert fp32.accuracy == pytest.approx(1 - fp32.metrics["cer"])


def test_a_charset_that_does_not_fit_the_output_is_refused(recognizer: Path, tmp_path: Path) -> None:
    (tmp_path / "chars.txt").write_text("a\nb\n")
    d = copy_dataset(tmp_path, "rec-validation")
    shutil.copy(tmp_path / "chars.txt", d / "chars.txt")
    with pytest.raises(ModelError, match=r"postprocess.charset: 4 classes .* but the output has 6625"):
        optimize_model(recognizer, DATA / "rec-calibration", d,
                       OptimizationPolicy(task="text-recognition", postprocess={"charset": "chars.txt"},
                                          candidates=()), Gates(), tmp_path / "out")


def test_cli_bad_ground_truth_is_exit_6_with_the_sample_named(detector: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    d = copy_dataset(tmp_path)
    edit(d, lambda doc: doc["samples"][3].update(truth=[[1, 2, 3]]))
    r = subprocess.run([sys.executable, "-m", "builder.cli", "model", "optimize", "--model", str(detector),
                        "--calibration", str(DATA / "det-calibration"), "--validation", str(d),
                        "--task", "detection", "--candidates", "", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr
    assert "page-288x576.npz: ground truth '[[1, 2, 3]]' is not a list of [x0, y0, x1, y1] boxes" in r.stderr
