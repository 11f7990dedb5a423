"""ANLS (Average Normalised Levenshtein Similarity) for DocVQA and InfographicVQA.

For a prediction ``p`` and an answer ``a``: ``NL = lev(p, a) / max(|p|, |a|)``;
the question scores ``max over answers of (1 - NL if NL < 0.5 else 0)``; ANLS is the
mean over questions.

Modes:

* ``"canonical"`` (Biten et al., 2019): both strings are stripped, lower-cased and their
  whitespace collapsed; the same strings give the distance and the length. ``NL = 0.5``
  scores 0.
* ``"qwen"`` (the DocVQA/InfographicVQA script used by Qwen-VL): the distance is taken on
  the whitespace-collapsed lower-cased strings but the length on the raw strings
  upper-cased; the question scores ``1 - min NL`` unless that is below 0.5, so
  ``NL = 0.5`` keeps 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen_vl.eval.metrics.scores import Mode, Scores, check_lengths, check_mode, scores_of

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _collapse(text: str) -> str:
    return " ".join(text.strip().lower().split())


def _nl_canonical(prediction: str, answer: str) -> float:
    p, a = _collapse(prediction), _collapse(answer)
    length = max(len(p), len(a))
    return 0.0 if length == 0 else levenshtein(p, a) / length


def _nl_qwen(prediction: str, answer: str) -> float:
    length = max(len(answer.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else levenshtein(_collapse(answer), _collapse(prediction)) / length


def anls(prediction: str, answers: Sequence[str], mode: Mode = "canonical", threshold: float = THRESHOLD) -> float:
    """The ANLS score of one prediction against its accepted answers, in 0..1."""
    check_mode(mode)
    if not answers:
        raise ValueError("answers must not be empty")
    if mode == "canonical":
        return max((1.0 - nl if nl < threshold else 0.0) for nl in (_nl_canonical(prediction, a) for a in answers))
    score = 1.0 - min(_nl_qwen(prediction, a) for a in answers)
    return 0.0 if score < threshold else score


def anls_scores(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    mode: Mode = "canonical",
    threshold: float = THRESHOLD,
) -> Scores:
    """``anls`` of each prediction and their mean (the benchmark's ANLS)."""
    check_lengths("predictions", predictions, "answers", answers)
    return scores_of([anls(p, a, mode, threshold) for p, a in zip(predictions, answers)])
