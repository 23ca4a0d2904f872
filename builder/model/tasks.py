"""Task metrics against ground truth, and fidelity to the FP32 reference. Pure numpy.

Every candidate is scored two ways:

- **fidelity** (always): each output against the FP32 candidate's over the validation set:
  cosine similarity, SNR in dB, max |diff|;
- **the task's own metric** (when the dataset has ground truth), from the output the spec's
  `postprocess` names:
  - classification: top-1 accuracy of the scores against class indices;
  - detection: precision, recall and F1 at an IoU threshold, the boxes taken from a text/object
    probability map [N, 1, H, W] (threshold, connected components, mean score, DB-style unclip);
  - text-recognition: character error rate of CTC greedy decoding against the texts.

Each task has one *score* in [0, 1], higher is better, that the accuracy gates apply to:
top-1 accuracy, F1, and character accuracy (1 - CER, floored at 0).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from builder.core.errors import ModelError

TASKS = ("classification", "detection", "text-recognition", "fidelity")
SCORE = {"classification": "accuracy", "detection": "f1", "text-recognition": "char_accuracy"}
Box = tuple[float, float, float, float]


@dataclass(frozen=True, kw_only=True)
class Postprocess:
    """How a task reads the model's output; defaults fit PP-OCR's detector and recognizer."""

    output: str | None = None  # the output the metric reads (None: the first)
    # detection: a probability map
    threshold: float = 0.3  # pixel probability that counts as the object
    box_threshold: float = 0.5  # mean probability inside a component to keep it
    min_size: int = 3  # pixels, the shorter side of a kept box
    unclip_ratio: float = 1.6  # DBNet maps shrink the object; grow each box by area * ratio / perimeter
    iou: float = 0.5  # a predicted box matches a true one at this IoU or more
    # text-recognition: CTC greedy decoding
    charset: str = "model:character"  # "model:KEY" (ONNX metadata, one symbol per line) or a file's text
    blank_index: int = 0
    space: bool = True  # the charset's last class is a space
    ignore_spaces: bool = True  # compare texts without whitespace (after NFKC normalization)

    def __post_init__(self) -> None:
        for name in ("threshold", "box_threshold", "iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ModelError(f"postprocess.{name}: {getattr(self, name)} must be within 0..1")
        if self.min_size < 0 or self.unclip_ratio < 0 or self.blank_index < 0:
            raise ModelError("postprocess: min_size, unclip_ratio and blank_index must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- ground truth ------------------------------------------------------------------------------------

def check_truth(task: str, truth: Sequence[Any], where: Any) -> None:
    """Refuse ground truth in the wrong form for the task, naming the sample."""
    for i, t in enumerate(truth):
        ok = {
            "classification": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "detection": _is_boxes,
            "text-recognition": lambda v: isinstance(v, str),
            "fidelity": lambda v: True,
        }[task](t)
        if not ok:
            want = {"classification": "a class index (integer >= 0)",
                    "detection": "a list of [x0, y0, x1, y1] boxes with x0 < x1 and y0 < y1",
                    "text-recognition": "a text (string)"}[task]
            raise ModelError(f"{where(i)}: ground truth {str(t)[:80]!r} is not {want} for task {task}")


def _is_boxes(v: object) -> bool:
    if not isinstance(v, list):
        return False
    for b in v:
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(c, int | float) and
                                                            not isinstance(c, bool) for c in b)):
            return False
        if not (b[0] < b[2] and b[1] < b[3]):
            return False
    return True


# -- fidelity ----------------------------------------------------------------------------------------

def fidelity(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict[str, float | None]:
    """One output against FP32 over the whole validation set: cosine similarity and SNR (dB) of all
    samples together, max |diff|, and the worst single sample's cosine (shown, not gated: on a sparse
    output, such as a detector's map of an image without objects, one sample's cosine is noise)."""
    if len(outputs) != len(reference):
        raise ModelError(f"{len(outputs)} outputs for {len(reference)} reference samples")
    dot = signal = other = noise = 0.0
    worst, cos_min = 0.0, 1.0
    for got, ref in zip(outputs, reference, strict=True):
        a = ref.astype(np.float64).ravel()
        b = got.astype(np.float64).ravel()
        if a.shape != b.shape:
            raise ModelError(f"output shape {list(got.shape)} differs from FP32's {list(ref.shape)}")
        same = (a == b) | (np.isnan(a) & np.isnan(b))  # the same inf or NaN as FP32 (a masked logit) is no error
        if not np.all((np.isfinite(a) & np.isfinite(b)) | same):
            return {"cosine": -1.0, "snr_db": -1000.0, "max_abs_diff": 1e308, "cosine_min": -1.0}
        finite = np.isfinite(a) & np.isfinite(b)
        a, b = a[finite], b[finite]
        d, s2, o2 = float(a @ b), float(a @ a), float(b @ b)
        dot, signal, other = dot + d, signal + s2, other + o2
        noise += float(np.sum((a - b) ** 2))
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
        cos_min = min(cos_min, _cosine(d, s2, o2))
    # None: no noise at all (the same outputs); -1000 dB: all noise (a zero reference)
    snr = None if noise == 0 else 10 * math.log10(signal / noise) if signal else -1000.0
    return {"cosine": _cosine(dot, signal, other), "snr_db": snr, "max_abs_diff": worst, "cosine_min": cos_min}


def _cosine(dot: float, aa: float, bb: float) -> float:
    if aa == 0 and bb == 0:
        return 1.0
    if aa == 0 or bb == 0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))


# -- classification ----------------------------------------------------------------------------------

def classification(outputs: Sequence[np.ndarray], truth: Sequence[Any]) -> dict[str, float]:
    scores = np.concatenate([o.reshape(len(o), -1) for o in outputs])
    labels = np.asarray(truth, dtype=np.int64).reshape(-1)
    if len(labels) != len(scores):
        raise ModelError(f"{len(labels)} labels for {len(scores)} outputs")
    if labels.max(initial=0) >= scores.shape[1]:
        raise ModelError(f"label {int(labels.max())} but the output has {scores.shape[1]} classes")
    return {"accuracy": float(np.mean(scores.argmax(1) == labels))}


def agreement(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Fraction of samples whose top-1 class (over the flattened output) matches FP32's."""
    a = np.concatenate([o.reshape(len(o), -1) for o in outputs]).argmax(1)
    b = np.concatenate([o.reshape(len(o), -1) for o in reference]).argmax(1)
    return float(np.mean(a == b))


# -- detection ---------------------------------------------------------------------------------------

def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean map, each as an array of (row, col) pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for r0, c0 in np.argwhere(mask):
        if seen[r0, c0]:
            continue
        stack, pixels = [(int(r0), int(c0))], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.asarray(pixels))
    return out


def boxes_from_map(prob: np.ndarray, p: Postprocess) -> list[Box]:
    """Axis-aligned boxes [x0, y0, x1, y1] (pixels, x1/y1 exclusive) from one probability map."""
    if prob.ndim == 3:
        prob = prob[0]
    if prob.ndim != 2:
        raise ModelError(f"detection needs a probability map [N, 1, H, W] or [N, H, W], got a sample of "
                         f"shape {list(prob.shape)}")
    h, w = prob.shape
    boxes = []
    for pix in _components(prob > p.threshold):
        if float(prob[pix[:, 0], pix[:, 1]].mean()) < p.box_threshold:
            continue
        y0, x0 = pix.min(0)
        y1, x1 = pix.max(0) + 1
        bw, bh = float(x1 - x0), float(y1 - y0)
        if min(bw, bh) < p.min_size:
            continue
        grow = bw * bh * p.unclip_ratio / (2 * (bw + bh))
        boxes.append((max(0.0, x0 - grow), max(0.0, y0 - grow), min(float(w), x1 + grow), min(float(h), y1 + grow)))
    return boxes


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(pred: Sequence[Box], true: Sequence[Box], threshold: float) -> int:
    """True positives: greedy one-to-one matching by IoU, highest first."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(true)), reverse=True)
    used_p, used_t, tp = set(), set(), 0
    for v, i, j in pairs:
        if v < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            tp += 1
    return tp


def detection(outputs: Sequence[np.ndarray], truth: Sequence[Any], p: Postprocess) -> dict[str, float]:
    tp = fp = fn = 0
    for out, true in zip(outputs, truth, strict=True):
        if len(out) != 1:
            raise ModelError("detection ground truth is per image: each sample needs batch size 1")
        pred = boxes_from_map(out[0], p)
        t = [tuple(float(c) for c in b) for b in true]
        hit = match(pred, t, p.iou)  # type: ignore[arg-type]
        tp, fp, fn = tp + hit, fp + len(pred) - hit, fn + len(t) - hit
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


# -- text recognition --------------------------------------------------------------------------------

def charset(p: Postprocess, metadata: dict[str, str], read_file: Any, classes: int | None) -> list[str]:
    """The CTC classes in order: blank, the symbols, then a space when `space`."""
    source = p.charset
    if source.startswith("model:"):
        key = source.removeprefix("model:")
        if key not in metadata:
            raise ModelError(f"postprocess.charset: the model has no metadata {key!r} "
                             f"(it has: {', '.join(sorted(metadata)) or 'none'})")
        symbols = metadata[key].splitlines()
    else:
        symbols = read_file(source).splitlines()
    table = [*symbols[:p.blank_index], "", *symbols[p.blank_index:], *([" "] if p.space else [])]
    if classes is not None and len(table) != classes:
        raise ModelError(f"postprocess.charset: {len(table)} classes (blank, {len(symbols)} symbols"
                         f"{', space' if p.space else ''}) but the output has {classes}")
    return table


def ctc_decode(probs: np.ndarray, table: Sequence[str], blank: int) -> str:
    """Greedy CTC: best class per step, repeats merged, blanks dropped."""
    best = probs.argmax(-1)
    out, prev = [], -1
    for k in best.tolist():
        if k != prev and k != blank and k < len(table):
            out.append(table[k])
        prev = k
    return "".join(out)


def normalized(text: str, ignore_spaces: bool) -> str:
    text = unicodedata.normalize("NFKC", text)
    return "".join(text.split()) if ignore_spaces else text


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_recognition(outputs: Sequence[np.ndarray], truth: Sequence[Any], table: Sequence[str],
                     p: Postprocess) -> dict[str, Any]:
    errors = chars = exact = 0
    texts = []
    for out, true in zip(outputs, truth, strict=True):
        if out.ndim != 3 or len(out) != 1:
            raise ModelError(f"text-recognition needs one [1, T, classes] output per sample, got "
                             f"{list(out.shape)}")
        got = ctc_decode(out[0], table, p.blank_index)
        texts.append(got)
        a, b = normalized(got, p.ignore_spaces), normalized(true, p.ignore_spaces)
        errors += edit_distance(a, b)
        chars += len(b)
        exact += a == b
    cer = errors / chars if chars else 0.0
    return {"char_accuracy": max(0.0, 1.0 - cer), "cer": cer, "exact": exact / len(truth),
            "texts": texts}


def task_metrics(task: str, outputs: Sequence[np.ndarray], truth: Sequence[Any], p: Postprocess,
                 table: Sequence[str] | None) -> dict[str, Any]:
    """The task's figures (with its score under SCORE[task]); {} for "fidelity"."""
    if task == "classification":
        return classification(outputs, truth)
    if task == "detection":
        return detection(outputs, truth, p)
    if task == "text-recognition":
        assert table is not None
        return text_recognition(outputs, truth, table, p)
    return {}
