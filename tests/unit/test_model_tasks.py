"""Task metrics and fidelity (builder.model.tasks): hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from builder.core.errors import ModelError
from builder.model import tasks
from builder.model.tasks import Postprocess

pytestmark = pytest.mark.unit


def test_iou_and_greedy_matching() -> None:
    assert tasks.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert tasks.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    # one prediction can match one truth only, the best pair first
    assert tasks.match([(0, 0, 10, 10), (0, 0, 10, 9)], [(0, 0, 10, 10)], 0.5) == 1
    assert tasks.match([(0, 0, 10, 10)], [(0, 0, 10, 10), (1, 0, 10, 10)], 0.5) == 1


def test_boxes_from_a_probability_map() -> None:
    prob = np.zeros((1, 40, 60), np.float32)
    prob[0, 10:14, 5:45] = 0.9  # a text line
    prob[0, 30:32, 50:52] = 0.9  # too small (2 px)
    prob[0, 20:25, 20:30] = 0.35  # above the threshold, mean under box_threshold
    boxes = tasks.boxes_from_map(prob, Postprocess(unclip_ratio=0.0))
    assert boxes == [(5.0, 10.0, 45.0, 14.0)]
    grown = tasks.boxes_from_map(prob, Postprocess(unclip_ratio=1.0))
    d = 40 * 4 * 1.0 / (2 * 44)
    assert grown[0] == pytest.approx((5 - d, 10 - d, 45 + d, 14 + d))


def test_detection_precision_recall_f1() -> None:
    prob = np.zeros((1, 1, 40, 60), np.float32)
    prob[0, 0, 10:14, 5:45] = 0.9
    prob[0, 0, 30:34, 5:20] = 0.9
    truth = [[[5, 10, 45, 14], [30, 30, 50, 36]]]  # one found, one missed; one false box
    m = tasks.detection([prob], truth, Postprocess(unclip_ratio=0.0))
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["precision"] == m["recall"] == m["f1"] == 0.5
    empty = tasks.detection([np.zeros((1, 1, 8, 8), np.float32)], [[]], Postprocess())
    assert empty["f1"] == 1.0  # nothing to find, nothing found


def test_ctc_decoding_and_character_error_rate() -> None:
    table = ["", "a", "b", " "]
    steps = [1, 1, 0, 1, 2, 2, 3, 2]  # a a _ a b b ' ' b -> "aab b"
    probs = np.eye(4, dtype=np.float32)[steps][None]
    assert tasks.ctc_decode(probs[0], table, 0) == "aab b"
    m = tasks.text_recognition([probs], ["aabb"], table, Postprocess())  # spaces ignored
    assert m["cer"] == 0.0 and m["exact"] == 1.0
    m = tasks.text_recognition([probs], ["abbb x"], table, Postprocess(ignore_spaces=False))
    assert m["cer"] == pytest.approx(tasks.edit_distance("aab b", "abbb x") / 6)
    assert tasks.edit_distance("kitten", "sitting") == 3
    assert tasks.normalized("（coins）", True) == "(coins)"  # NFKC: full-width brackets


def test_charset_from_the_model_metadata_must_fit_the_output() -> None:
    table = tasks.charset(Postprocess(), {"character": "a\nb"}, None, 4)
    assert table == ["", "a", "b", " "]
    with pytest.raises(ModelError, match=r"4 classes .* but the output has 5"):
        tasks.charset(Postprocess(), {"character": "a\nb"}, None, 5)
    with pytest.raises(ModelError, match="no metadata 'character'"):
        tasks.charset(Postprocess(), {}, None, 4)


def test_fidelity_over_the_whole_set() -> None:
    ref = [np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]])]  # the second: a sparse output, all zero
    same = tasks.fidelity(ref, ref)
    assert same["cosine"] == 1.0 and same["snr_db"] is None and same["max_abs_diff"] == 0.0
    noisy = [np.array([[1.0, 0.1]]), np.array([[0.0, 0.1]])]
    f = tasks.fidelity(noisy, ref)
    assert f["snr_db"] == pytest.approx(10 * math.log10(1.0 / 0.02))
    assert f["cosine"] == pytest.approx(1.0 / math.sqrt(1.02))
    assert f["cosine_min"] == 0.0  # the all-zero sample on its own: its cosine says nothing
    assert tasks.fidelity([np.array([[np.nan, 0.0]]), ref[1]], ref)["cosine"] == -1.0


def test_ground_truth_forms_are_checked() -> None:
    tasks.check_truth("detection", [[[0, 0, 1, 1]], []], str)
    with pytest.raises(ModelError, match=r"sample-1: ground truth .* is not a list of"):
        tasks.check_truth("detection", [[], [[0, 0, 0, 1]]], lambda i: f"sample-{i}")
    with pytest.raises(ModelError, match="is not a class index"):
        tasks.check_truth("classification", [True], str)
    with pytest.raises(ModelError, match="is not a text"):
        tasks.check_truth("text-recognition", [3], str)


def test_the_same_infinities_as_fp32_are_no_error() -> None:
    """Found in review: FP32 against itself with a masked logit (-inf) scored cosine -1."""
    ref = [np.array([[1.0, -np.inf, 2.0]])]
    same = tasks.fidelity(ref, ref)
    assert same["cosine"] == 1.0 and same["max_abs_diff"] == 0.0
    other = tasks.fidelity([np.array([[1.0, 0.0, 2.0]])], ref)  # the candidate lost the mask
    assert other["cosine"] == -1.0


def test_mixed_search_steps_reach_the_limit() -> None:
    """Found in review: the steps were a fixed list (1, 2, 4, 8, 16), whatever the limit."""
    from builder.model.pipeline import mixed_steps

    assert mixed_steps(0) == [0]  # plain INT8 first: no node kept unless one must be
    assert mixed_steps(1) == [0, 1]
    assert mixed_steps(5) == [0, 1, 2, 4, 5]
    assert mixed_steps(16) == [0, 1, 2, 4, 8, 16]
    assert mixed_steps(40) == [0, 1, 2, 4, 8, 16, 32, 40]
