"""Referring-expression grounding (RefCOCO, RefCOCO+, RefCOCOg): box parsing, IoU, Acc@0.5.

The model writes ``<box>(x1,y1),(x2,y2)</box>`` in a 0-1000 space; the box is mapped to
pixels of the image and compared with the target box (pixels, ``(x1, y1, x2, y2)``).
``Acc@0.5 = mean over items of [IoU(predicted, target) >= 0.5]``.

Modes:

* ``"canonical"``: the first well-formed box in the text counts, tagged
  (``<box>…</box>``, read by ``qwen_vl.grounding.parse_grounding``) or bare
  (``(x1,y1),(x2,y2)``, as left when special tokens are skipped in decoding); spaces are
  allowed, coordinates are integers in 0..1000, swapped corners are put in order;
  ``x_pixel = x * width / 1000``. IoU is 0 for boxes with no area.
* ``"qwen"`` (Qwen-VL's ``evaluate_grounding.py``): only the first match of
  ``(…),(…)`` counts (a space after the comma between the points fails), anything
  unreadable becomes the box (0, 0, 0, 0); coordinates are divided by 999; IoU is
  torchvision's in float32 (signed areas, so swapped corners score 0).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from qwen_vl.eval.metrics.scores import Mode, Scores, check_lengths, check_mode, scores_of
from qwen_vl.grounding import SCALE, Box, parse_grounding

BoxXYXY = tuple[float, float, float, float]

HIT_IOU = 0.5
QWEN_SCALE = 999

_TAGGED_SHAPE = re.compile(r"<(box|quad)>[^<]*</\1>")
_BARE_BOX = re.compile(r"\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)\s*,\s*\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)")
_QWEN_BOX = re.compile(r"\((.*?)\),\((.*?)\)")


def _first_bare_box(text: str) -> tuple[int, Box] | None:
    """The first bare ``(x1,y1),(x2,y2)`` with coordinates in 0..1000 and where it starts."""
    for match in _BARE_BOX.finditer(text):
        values = [int(v) for v in match.groups()]
        if all(v <= SCALE for v in values):
            return match.start(), Box(*values)
    return None


def _parse_canonical(text: str) -> Box | None:
    tagged = [(o.span[0], o.box) for o in parse_grounding(text).objects if isinstance(o.box, Box)]
    # Tagged shapes are blanked (same length) so that their points are not read again as bare boxes.
    bare = _first_bare_box(_TAGGED_SHAPE.sub(lambda m: " " * len(m.group(0)), text))
    candidates = tagged[:1] + ([bare] if bare else [])
    if not candidates:
        return None
    return min(candidates, key=lambda c: c[0])[1].ordered()


def _parse_qwen(text: str) -> BoxXYXY:
    match = _QWEN_BOX.search(text)
    try:
        first, second = match.groups()  # type: ignore[union-attr]
        if "," not in first or "," not in second:
            return (0.0, 0.0, 0.0, 0.0)
        x1, y1 = (float(v) for v in first.split(","))
        x2, y2 = (float(v) for v in second.split(","))
    except (AttributeError, ValueError):
        return (0.0, 0.0, 0.0, 0.0)
    return (x1, y1, x2, y2)


def parse_box(text: str, mode: Mode = "canonical") -> BoxXYXY | None:
    """The predicted box in model units (0..1000), or None when the text has none.

    ``"qwen"`` never gives None: what it cannot read is ``(0, 0, 0, 0)``.
    """
    check_mode(mode)
    if mode == "qwen":
        return _parse_qwen(text)
    box = _parse_canonical(text)
    return None if box is None else (float(box.x1), float(box.y1), float(box.x2), float(box.y2))


def box_to_pixels(box: BoxXYXY, width: float, height: float, scale: float = SCALE) -> BoxXYXY:
    """``(x1 * width / scale, y1 * height / scale, x2 * width / scale, y2 * height / scale)``."""
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box
    return (x1 * width / scale, y1 * height / scale, x2 * width / scale, y2 * height / scale)


def _iou_canonical(a: BoxXYXY, b: BoxXYXY) -> float:
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inter / (area_a + area_b - inter)


def _iou_qwen(a: BoxXYXY, b: BoxXYXY) -> float:
    ta = torch.tensor(a, dtype=torch.float32)  # (4,)
    tb = torch.tensor(b, dtype=torch.float32)  # (4,)
    area_a = (ta[2] - ta[0]) * (ta[3] - ta[1])
    area_b = (tb[2] - tb[0]) * (tb[3] - tb[1])
    wh = (torch.minimum(ta[2:], tb[2:]) - torch.maximum(ta[:2], tb[:2])).clamp(min=0)  # (2,)
    inter = wh[0] * wh[1]
    iou = (inter / (area_a + area_b - inter)).item()
    return 0.0 if iou != iou else iou  # 0/0 (NaN) is never a hit


def box_iou(a: BoxXYXY, b: BoxXYXY, mode: Mode = "canonical") -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes.

    ``"canonical"`` orders the corners and gives 0 when either box has no area;
    ``"qwen"`` uses signed areas in float32 as torchvision does (NaN becomes 0).
    """
    check_mode(mode)
    return _iou_canonical(a, b) if mode == "canonical" else _iou_qwen(a, b)


def prediction_iou(text: str, target: BoxXYXY, width: float, height: float, mode: Mode = "canonical") -> float:
    """IoU between the box parsed from ``text`` (mapped to pixels) and the pixel ``target``; 0 if none."""
    box = parse_box(text, mode)
    if box is None:
        return 0.0
    if mode == "canonical":
        return box_iou(box_to_pixels(box, width, height), target, mode)
    pred = torch.tensor(box, dtype=torch.float32) / QWEN_SCALE  # (4,) float32 as in the script
    pred[0::2] *= width
    pred[1::2] *= height
    return box_iou(tuple(pred.tolist()), target, mode)  # type: ignore[arg-type]


def grounding_accuracy(
    predictions: Sequence[str],
    targets: Sequence[BoxXYXY],
    sizes: Sequence[tuple[float, float]],
    mode: Mode = "canonical",
) -> Scores:
    """Acc@0.5: per item 1.0 when ``prediction_iou >= 0.5`` (inclusive), and the mean.

    ``targets`` are pixel boxes ``(x1, y1, x2, y2)``; ``sizes`` are ``(width, height)``.
    """
    check_lengths("predictions", predictions, "targets", targets)
    check_lengths("predictions", predictions, "sizes", sizes)
    return scores_of(
        [float(prediction_iou(p, t, w, h, mode) >= HIT_IOU) for p, t, (w, h) in zip(predictions, targets, sizes)]
    )
