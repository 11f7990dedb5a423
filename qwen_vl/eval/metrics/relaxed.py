"""ChartQA relaxed accuracy: numbers within 5% count as correct, other answers must match.

``correct = |prediction - target| / |target| <= 0.05`` when both are numbers (and the
target is not 0), else ``prediction.lower() == target.lower()``; an item is correct when
it is correct for any of its targets.

Modes:

* ``"canonical"`` (ChartQA, Masry et al. 2022): the tolerance is relative to the gold
  answer. Both sides are stripped; ``"45%"`` reads as 0.45 (as in pix2struct's
  reference implementation); ``"1,000"`` reads as 1000; a target of 0 needs a
  prediction equal to 0.
* ``"qwen"`` (Qwen-VL's script): the arguments are swapped, so the tolerance is relative
  to the prediction; numbers are read with Python's ``float`` (``"1,000"`` is not a
  number; ``"45%"`` is 0.45); when the prediction reads as 0 the strings are compared;
  only the prediction is stripped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from qwen_vl.eval.metrics.scores import Mode, Scores, check_lengths, check_mode, scores_of

TOLERANCE = 0.05

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def parse_number(text: str) -> float | None:
    """The number written in ``text`` (``"12"``, ``"-3.5"``, ``"1,000"``, ``"45%"`` -> 0.45) or None."""
    text = text.strip()
    percent = text.endswith("%")
    if percent:
        text = text[:-1].strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value / 100.0 if percent else value


def _python_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def _correct(prediction: str, target: str, tolerance: float, read: Callable[[str], float | None]) -> bool:
    p, t = read(prediction), read(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_match(prediction: str, target: str, mode: Mode = "canonical", tolerance: float = TOLERANCE) -> bool:
    """Whether ``prediction`` is correct for one ``target`` (see the module docstring)."""
    check_mode(mode)
    if mode == "canonical":
        prediction, target = prediction.strip(), target.strip()
        p, t = parse_number(prediction), parse_number(target)
        if p is not None and t == 0:
            return p == 0
        return _correct(prediction, target, tolerance, parse_number)
    return _correct(target, prediction.strip(), tolerance, _python_float)


def relaxed_accuracy(
    predictions: Sequence[str],
    targets: Sequence[str | Sequence[str]],
    mode: Mode = "canonical",
    tolerance: float = TOLERANCE,
) -> Scores:
    """Per item 1.0 if ``relaxed_match`` holds for any of its targets (a string or a list), and the mean."""
    check_lengths("predictions", predictions, "targets", targets)
    per_item = []
    for prediction, item_targets in zip(predictions, targets):
        options = [item_targets] if isinstance(item_targets, str) else list(item_targets)
        if not options:
            raise ValueError("every item needs at least one target")
        per_item.append(float(any(relaxed_match(prediction, t, mode, tolerance) for t in options)))
    return scores_of(per_item)
