"""MME: yes/no questions, two per image; per-subtask acc and acc+, perception and cognition totals.

For a subtask: ``acc`` = share of questions answered right, ``acc+`` = share of images
with both questions right, ``score = 100 * acc + 100 * acc+`` (0..200). Perception is
the sum over its 10 subtasks (0..2000), cognition over its 4 (0..800).

Modes:

* ``"canonical"``: a reply reads as yes or no when its first word is ``yes``/``no``, or
  when exactly one of the words ``yes``/``no`` appears in it; acc+ groups the questions
  of a subtask by image.
* ``"qwen"`` (the MME authors' ``calculation.py``, used by Qwen-VL): the lower-cased reply
  is ``yes``/``no`` or else only its first four characters are searched, ``"yes"`` first
  then ``"no"`` (so ``"Not sure"`` reads as no); acc+ pairs consecutive questions of a subtask.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from qwen_vl.eval.metrics.scores import Mode, check_mode

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

Label = Literal["yes", "no", "other"]
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class MMEItem:
    """One answered MME question: its subtask, image, gold answer (yes/no) and the model's reply."""

    subtask: str
    image: str
    answer: str
    response: str


@dataclass(frozen=True)
class SubtaskScore:
    """``acc`` and ``acc_plus`` in 0..1, ``score = 100 * (acc + acc_plus)``."""

    acc: float
    acc_plus: float
    score: float
    questions: int
    other: int  # replies read as neither yes nor no


@dataclass(frozen=True)
class MMEResult:
    """Scores per subtask, and the perception / cognition totals over the subtasks present."""

    subtasks: dict[str, SubtaskScore]
    perception: float
    cognition: float


def parse_yes_no(response: str, mode: Mode = "canonical") -> Label:
    """``"yes"``, ``"no"`` or ``"other"`` for a reply (see the module docstring)."""
    check_mode(mode)
    text = response.lower()
    if mode == "qwen":
        if text in ("yes", "no"):
            return text  # type: ignore[return-value]
        return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"
    words = _WORD.findall(text)
    if not words:
        return "other"
    if words[0] in ("yes", "no"):
        return words[0]  # type: ignore[return-value]
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else "other"  # type: ignore[return-value]


def _groups(items: list[MMEItem], mode: Mode) -> list[list[MMEItem]]:
    if mode == "qwen":
        if len(items) % 2:
            raise ValueError(f"subtask {items[0].subtask!r} has {len(items)} questions; pairs are needed")
        return [items[i : i + 2] for i in range(0, len(items), 2)]
    by_image: dict[str, list[MMEItem]] = {}
    for item in items:
        by_image.setdefault(item.image, []).append(item)
    return list(by_image.values())


def _subtask_score(items: list[MMEItem], mode: Mode) -> SubtaskScore:
    correct: dict[int, bool] = {}
    other = 0
    for item in items:
        gold = item.answer.strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(
                f"subtask {item.subtask!r}, image {item.image!r}: answer must be yes or no, got {item.answer!r}"
            )
        label = parse_yes_no(item.response, mode)
        other += label == "other"
        correct[id(item)] = label == gold
    groups = _groups(items, mode)
    acc = sum(correct.values()) / len(items)
    acc_plus = sum(all(correct[id(i)] for i in group) for group in groups) / len(groups)
    return SubtaskScore(acc, acc_plus, 100 * acc + 100 * acc_plus, len(items), other)


def mme_scores(items: Sequence[MMEItem], mode: Mode = "canonical") -> MMEResult:
    """Per-subtask acc, acc+ and score, and the perception and cognition sums."""
    check_mode(mode)
    by_subtask: dict[str, list[MMEItem]] = {}
    for item in items:
        by_subtask.setdefault(item.subtask, []).append(item)
    subtasks = {name: _subtask_score(group, mode) for name, group in by_subtask.items()}
    perception = sum(s.score for name, s in subtasks.items() if name in PERCEPTION)
    cognition = sum(s.score for name, s in subtasks.items() if name in COGNITION)
    return MMEResult(subtasks, perception, cognition)
