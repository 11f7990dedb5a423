"""Exact-match accuracy (OCR-VQA, AI2D, GQA).

``correct = prediction.strip().lower() == target.strip().lower()`` for any target.

GQA modes:

* ``"canonical"``: exact match as above.
* ``"qwen"`` (Qwen-VL's script): the prediction is first cut by ``qwen_gqa_cut``.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen_vl.eval.metrics.scores import Mode, Scores, check_lengths, check_mode, scores_of

# (substring, which piece of ``str.split`` is kept), applied in this order.
_GQA_CUTS = (("is ", 1), ("are ", 1), ("a ", 1), ("an ", 1), ("the ", 1), (" of", 0))


def exact_match(prediction: str, targets: str | Sequence[str]) -> float:
    """1.0 if the stripped, lower-cased prediction equals any stripped, lower-cased target, else 0.0."""
    options = [targets] if isinstance(targets, str) else list(targets)
    if not options:
        raise ValueError("targets must not be empty")
    pred = prediction.strip().lower()
    return float(any(pred == t.strip().lower() for t in options))


def qwen_gqa_cut(prediction: str) -> str:
    """Qwen-VL's GQA post-processing.

    Keep the text before the first ``.``, ``,`` and ``!``, lower-case it; then for each of
    ``"is "``, ``"are "``, ``"a "``, ``"an "``, ``"the "`` found anywhere (also inside
    words), keep the piece between its first and second occurrence; cut at ``" of"``;
    strip. ``"tennis racket"`` -> ``"racket"``.
    """
    text = prediction.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    for needle, piece in _GQA_CUTS:
        if needle in text:
            text = text.split(needle)[piece]
    return text.strip()


def exact_match_accuracy(predictions: Sequence[str], targets: Sequence[str | Sequence[str]]) -> Scores:
    """``exact_match`` per item and the mean (OCR-VQA, AI2D)."""
    check_lengths("predictions", predictions, "targets", targets)
    return scores_of([exact_match(p, t) for p, t in zip(predictions, targets)])


def gqa_accuracy(
    predictions: Sequence[str], targets: Sequence[str | Sequence[str]], mode: Mode = "canonical"
) -> Scores:
    """GQA accuracy: exact match, after ``qwen_gqa_cut`` in ``"qwen"`` mode."""
    check_mode(mode)
    if mode == "qwen":
        predictions = [qwen_gqa_cut(p) for p in predictions]
    return exact_match_accuracy(predictions, targets)
