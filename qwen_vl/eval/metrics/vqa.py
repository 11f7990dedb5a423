"""VQA accuracy (VQAv2, OK-VQA, VizWiz, TextVQA) with the official answer normalisation.

``accuracy = mean over i of min(#{j != i : answer_j == prediction} / 3, 1)`` over the
(usually 10) human answers, i.e. ``min(#matches / 3, 1)`` averaged over the
10-choose-9 subsets of annotators.

Modes:

* ``"canonical"``: GT-Vision-Lab's scorer. Answers and prediction lose newlines, tabs and
  outer spaces; when the answers are not all identical, both the answers and the
  prediction are normalised (``normalize_answer``), otherwise nothing is normalised.
* ``"qwen"``: the copy in Qwen-VL's ``eval_mm``: the prediction is always normalised; the
  answers only get ``process_punctuation`` (no lower-casing, digits or articles), and
  only when they are not all identical; leaving one out removes every answer *dict*
  equal to it, so ``answer_id`` matters (strings get ``answer_id`` 1, 2, ... as in the
  annotation files).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from qwen_vl.eval.metrics.scores import Mode, Scores, check_lengths, check_mode, scores_of

Answer = str | Mapping[str, Any]

#: Characters replaced by a space, or deleted when written next to a space (or when
#: the text has a digit-comma-digit such as ``1,000``: then all of them are deleted).
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
#: Number words written as digits.
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
#: The official period-stripping call passes ``re.UNICODE`` (32) as its ``count``.
_MAX_PERIODS = 32

# Contractions the scorer restores, written with their apostrophes. A word spelled
# without one apostrophe of a form (``dont``, ``couldnt've``, ``couldn'tve``) becomes the form.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED:
        quotes = [i for i, c in enumerate(form) if c == "'"]
        for i in quotes:
            table[form[:i] + form[i + 1 :]] = form
    table["somebody'd"] = "somebodyd"  # the official table maps this one backwards
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()


def process_punctuation(text: str) -> str:
    """The scorer's punctuation step.

    Each character of ``PUNCTUATION`` is deleted if the text has it next to a space or
    has a digit-comma-digit anywhere, else replaced by a space; then up to 32 periods
    not followed by a digit are deleted (``"3.5"`` keeps its period).
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        delete = delete_all or p + " " in text or " " + p in text
        out = out.replace(p, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS)


def process_digits_articles(text: str) -> str:
    """Lower-case, number words to digits, drop articles, restore contractions, single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """``process_digits_articles(process_punctuation(text))``: ``"Two dogs!"`` -> ``"2 dogs"``."""
    return process_digits_articles(process_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _answer_text(answer: Answer) -> str:
    return answer if isinstance(answer, str) else str(answer["answer"])


def _accuracy_canonical(prediction: str, answers: Sequence[Answer]) -> float:
    pred = _clean(prediction)
    gts = [_clean(_answer_text(a)) for a in answers]
    if len(set(gts)) > 1:
        gts = [normalize_answer(g) for g in gts]
        pred = normalize_answer(pred)
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        total += min(1.0, matches / 3)
    return total / len(gts)


def _accuracy_qwen(prediction: str, answers: Sequence[Answer]) -> float:
    pred = normalize_answer(_clean(prediction))
    dicts = [{"answer": a, "answer_id": i + 1} if isinstance(a, str) else dict(a) for i, a in enumerate(answers)]
    if len({d["answer"] for d in dicts}) > 1:
        for d in dicts:
            d["answer"] = process_punctuation(d["answer"])
    total = 0.0
    for left_out in dicts:
        matches = sum(1 for d in dicts if d != left_out and d["answer"] == pred)
        total += min(1.0, matches / 3)
    return total / len(dicts)


def vqa_accuracy(prediction: str, answers: Sequence[Answer], mode: Mode = "canonical") -> float:
    """VQA accuracy of one prediction against its human answers (strings or annotation dicts
    with an ``"answer"`` key), in 0..1; see the module docstring for the two modes."""
    check_mode(mode)
    if not answers:
        raise ValueError("answers must not be empty")
    return _accuracy_canonical(prediction, answers) if mode == "canonical" else _accuracy_qwen(prediction, answers)


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[Answer]], mode: Mode = "canonical") -> Scores:
    """``vqa_accuracy`` of each prediction and their mean (multiply by 100 for the usual report)."""
    check_lengths("predictions", predictions, "answers", answers)
    return scores_of([vqa_accuracy(p, a, mode) for p, a in zip(predictions, answers)])
