"""Write the OCR example's data sets from scikit-image's bundled images (nothing else is downloaded).

    pip install scikit-image==0.26.0 pillow
    python models/ocr/prepare.py            # ~2 s, deterministic

The ground truth is hand-written (TRUTH below): text-line boxes read off `skimage.data.page()`
(a photographed book page, 191 x 384) and the text of each line as printed. The validation
images are never used for calibration:

- detector validation: the page at four sizes (boxes scaled with it) and six images without
  text (coins, camera, coffee, chelsea, hubble_deep_field, moon), where every box is a false positive;
- detector calibration: other images (text.png's handwriting, clock, brick, astronaut, rocket,
  immunohistochemistry);
- recognizer validation: the page's seven lines, whole and split in two at the widest word gap
  near the middle (21 crops, 48 px high, widths as the text needs);
- recognizer calibration: 48 px strips of text.png's handwriting and of the calibration images.

Samples are uint8 [1, 3, H, W]; dataset.json scales them as PP-OCR does ((x / 255 - 0.5) / 0.5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent / "data"
SCALE = {"x": {"scale": 2 / 255, "offset": -1.0}}
REC_HEIGHT = 48

# Hand-written: the page's text lines, [x0, y0, x1, y1] in the 191 x 384 image, and their text.
TRUTH = [
    ([5, 11, 292, 32], "Region-based segmentation"),
    ([5, 49, 377, 64], "Let us first determine markers of the coins and the"),
    ([5, 65, 377, 81], "background. These markers are pixels that we can label"),
    ([5, 83, 377, 100], "unambiguously as either object or background. Here,"),
    ([5, 101, 377, 118], "the markers are found at the two extreme parts of the"),
    ([5, 118, 171, 136], "histogram of grey values:"),
    ([20, 171, 241, 190], ">>> markers = np.zeros_like(coins)"),
]
# Where each line splits in two (x in the page), read off the word gaps, and the texts either side.
SPLITS = [
    (148, "Region-based", "segmentation"),
    (163, "Let us first determine", "markers of the coins and the"),
    (193, "background. These markers", "are pixels that we can label"),
    (177, "unambiguously as either", "object or background. Here,"),
    (176, "the markers are found", "at the two extreme parts of the"),
    (90, "histogram of", "grey values:"),
    (104, ">>> markers =", "np.zeros_like(coins)"),
]
NEGATIVES = ["coins", "camera", "coffee", "chelsea", "hubble_deep_field", "moon"]
CALIBRATION = ["text", "clock", "brick", "astronaut", "rocket", "immunohistochemistry"]


def rgb(a: np.ndarray) -> np.ndarray:
    return np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]


def to_sample(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.uint8)


def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def det_size(h: int, w: int, limit: int = 640) -> tuple[int, int]:
    """Both sides multiples of 32 (the detector's stride), the longer at most `limit`."""
    f = min(1.0, limit / max(h, w))
    return max(32, round(h * f / 32) * 32), max(32, round(w * f / 32) * 32)


def write(directory: Path, samples: list[tuple[str, np.ndarray, object]]) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    entries = []
    for name, x, truth in samples:
        np.savez_compressed(directory / f"{name}.npz", x=x)
        entries.append({"file": f"{name}.npz", **({"truth": truth} if truth is not None else {})})
    doc = {"inputs": SCALE, "samples": entries}
    (directory / "dataset.json").write_text(json.dumps(doc, indent=1) + "\n")


def detector() -> None:
    page = rgb(data.page())
    val = []
    for scale in (0.5, 0.75, 1.0, 1.5):  # the smallest first: the device's golden sample
        h, w = det_size(round(page.shape[0] * scale), round(page.shape[1] * scale))
        sy, sx = h / page.shape[0], w / page.shape[1]
        boxes = [[round(b[0] * sx, 1), round(b[1] * sy, 1), round(b[2] * sx, 1), round(b[3] * sy, 1)]
                 for b, _ in TRUTH]
        val.append((f"page-{h}x{w}", to_sample(resize(page, h, w)), boxes))
    for name in NEGATIVES:
        img = rgb(getattr(data, name)())
        h, w = det_size(*img.shape[:2], limit=480)
        val.append((name, to_sample(resize(img, h, w)), []))
    write(HERE / "det-validation", val)
    cal = []
    for name in CALIBRATION:
        img = rgb(getattr(data, name)())
        h, w = det_size(*img.shape[:2], limit=480)
        cal.append((name, to_sample(resize(img, h, w)), None))
    write(HERE / "det-calibration", cal)


def line_crop(page: np.ndarray, box: list[int], pad: int = 3, padx: int = 3) -> np.ndarray:
    x0, y0, x1, y1 = box
    crop = page[max(0, y0 - pad):y1 + pad, max(0, x0 - padx):x1 + padx]
    w = max(REC_HEIGHT, round(REC_HEIGHT * crop.shape[1] / crop.shape[0]))
    return to_sample(resize(crop, REC_HEIGHT, w))


def recognizer() -> None:
    page = rgb(data.page())
    val = []
    for i, ((box, text), (cut, left, right)) in enumerate(zip(TRUTH, SPLITS, strict=True)):
        val.append((f"line{i}", line_crop(page, box), text))
        val.append((f"line{i}a", line_crop(page, [box[0], box[1], cut, box[3]], padx=0), left))
        val.append((f"line{i}b", line_crop(page, [cut, box[1], box[2], box[3]], padx=0), right))
    write(HERE / "rec-validation", val)
    cal = []
    for name in CALIBRATION:
        img = rgb(getattr(data, name)())
        for j, top in enumerate(range(0, img.shape[0] - 40, max(40, img.shape[0] // 4))):
            strip = img[top:top + 40, : min(img.shape[1], 400)]
            cal.append((f"{name}-{j}", to_sample(resize(strip, REC_HEIGHT, round(REC_HEIGHT * strip.shape[1] / 40))),
                        None))
    write(HERE / "rec-calibration", cal[:24])


if __name__ == "__main__":
    detector()
    recognizer()
