"""Multiple choice: ScienceQA-IMG (test) and SEED-Bench (image part) -> accuracy.

Files expected (``data``):

* ScienceQA: the folder ``data/scienceqa/`` of the ScienceQA repository with
  ``problems.json`` (pid -> problem: ``question``, ``choices``, ``answer`` index,
  ``hint``, ``image``, ``subject``) and ``pid_splits.json`` (``"test": [pids]``); images at
  ``<image_root>/test/<pid>/image.png``, ``image_root`` by default ``<data>/images`` when
  that folder exists, else ``<data>``. ScienceQA-IMG is the test problems with an image.
  Or Qwen-VL's ``scienceqa_test_img.jsonl``: ``image``, ``hint``, ``question``,
  ``choices``, ``answer`` (index) per line.
* SEED-Bench: ``SEED-Bench.json`` (``"questions"``: ``question_id``, ``question``,
  ``choice_a`` .. ``choice_d``, ``answer`` letter, ``data_id``, ``question_type_id``);
  images at ``<image_root>/<data_id>``, ``image_root`` by default
  ``SEED-Bench-image/`` beside the file. The image part is question types 1-9. Or
  Qwen-VL's ``image_input.jsonl`` (``question_id``, ``prompt``, ``answer``), whose
  ``prompt`` holds ``<img>path</img>``, the question and the options.

Two ways to answer: generation, where the letter is read from the reply
(``metrics.choice.parse_choice``); and the ``-likelihood`` tasks, Qwen-VL's way, where the
prompt ends in ``Answer:`` and each option's continuation (`` A``, `` B``, ...) is scored by
the model's average loss, the lowest winning. Predictions may be letters, replies or
option indices (the likelihood runner's choice); all are scored as letters.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...finetune.records import DataError
from ..metrics.choice import choice_accuracy, parse_choice
from .base import EvalItem, PromptStyle, ReadResult, Task
from .reading import Entry, collect, field, image_file, json_entries, jsonl_entries, percent, record_id, strings

CHAT_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SEED_IMAGE_TYPES = range(1, 10)
_SEED_CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")
_QWEN_SEED_PROMPT = re.compile(r"<img>(.*?)</img>\n?(.*)\nAnswer:\s*$", re.S)


def options_text(options: Sequence[str]) -> str:
    """``"A. first\\nB. second ..."``."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(string.ascii_uppercase, options))


class MultipleChoiceTask(Task):
    """Shared prompt, postprocessing and scoring of the multiple-choice tasks.

    ``item.question`` is the text between the image and the options' end (context,
    question and options, as the benchmark's prompt writes them); ``item.target`` the
    answer letter; ``item.options`` the option texts.
    """

    family = "multiple_choice"
    metric = "accuracy"
    max_new_tokens = 10

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        if style == "base":
            return f"<img>{item.images[0]}</img>{item.question}\nAnswer:"
        return f"Picture 1: <img>{item.images[0]}</img>\n{item.question.lstrip()}\n{CHAT_INSTRUCTION}"

    def option_texts(self, item: EvalItem, style: PromptStyle) -> list[str]:
        """`` A``, `` B``, ... after the base prompt's ``Answer:``; ``A``, ``B``, ... as a chat reply."""
        letters = _letters(item)
        return [f" {c}" for c in letters] if style == "base" else list(letters)

    def postprocess(self, response: str, item: EvalItem) -> str:
        """The chosen letter, or ``""`` when the reply names none."""
        return parse_choice(response, item.options, _letters(item)) or ""

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        """Accuracy overall and per ``meta["category"]``; ``mode`` changes nothing here (Qwen-VL's
        difference is the likelihood selection, chosen by task name)."""
        letters = [_as_letter(p, item) for p, item in zip(predictions, items, strict=True)]
        hits = choice_accuracy(letters, [item.target for item in items]).per_item
        result: dict[str, Any] = {self.metric: percent(sum(hits) / len(hits) if hits else 0.0), "count": len(items)}
        by_category: dict[str, list[float]] = {}
        for item, hit in zip(items, hits):
            if "category" in item.meta:
                by_category.setdefault(str(item.meta["category"]), []).append(hit)
        for category in sorted(by_category):
            result[f"{self.metric}/{category}"] = percent(sum(by_category[category]) / len(by_category[category]))
        return result


def _letters(item: EvalItem) -> str:
    return string.ascii_uppercase[: len(item.options)] if item.options else "ABCD"


def _as_letter(prediction: Any, item: EvalItem) -> str:
    letters = _letters(item)
    if isinstance(prediction, int) and not isinstance(prediction, bool):
        return letters[prediction] if 0 <= prediction < len(letters) else ""
    return parse_choice(str(prediction), item.options, letters) or ""


class ScienceQAImgTask(MultipleChoiceTask):
    """ScienceQA test problems with an image; prompt ``Context: ...\\nQuestion: ...\\nOptions: ...``."""

    name = "scienceqa-img"

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if data.suffix == ".jsonl":
            root = Path(image_root) if image_root is not None else data.parent
            return collect(jsonl_entries(data), lambda e: self._jsonl_item(e, root), skip_bad)
        if image_root is None:
            image_root = data / "images" if (data / "images").is_dir() else data
        test = {str(pid) for pid in _test_pids(data / "pid_splits.json")}
        entries = [e for e in json_entries(data / "problems.json") if e.key in test]
        return collect(entries, lambda e: self._problem_item(e, Path(image_root)), skip_bad)

    def _problem_item(self, entry: Entry, root: Path) -> EvalItem | None:
        pid = entry.key
        image = field(entry, "image", (str, type(None)), pid)
        if image is None:
            return None  # a text-only problem: not part of ScienceQA-IMG
        path = image_file(entry, "image", root, pid, what=f"test/{pid}/{image}")
        return self._item(entry, str(pid), path, category=entry.value.get("subject"))

    def _jsonl_item(self, entry: Entry, root: Path) -> EvalItem:
        rid = entry.value.get("question_id", entry.value.get("id")) if isinstance(entry.value, dict) else None
        path = image_file(entry, "image", root, rid)
        return self._item(entry, str(rid) if rid is not None else str(entry.line), path, category=None)

    def _item(self, entry: Entry, rid: str, image: str, category: Any) -> EvalItem:
        question = field(entry, "question", str, rid)
        choices = strings(entry, "choices", rid)
        if len(choices) > 5:
            raise entry.error("choices", f"at most 5 choices are supported, got {len(choices)}", rid)
        answer = field(entry, "answer", int, rid)
        if not 0 <= answer < len(choices):
            raise entry.error("answer", f"index {answer} is outside the {len(choices)} choices", rid)
        hint = entry.value.get("hint") or "N/A"
        text = f"Context: {hint}\nQuestion: {question}\nOptions: {options_text(choices)}"
        meta = {} if category is None else {"category": category}
        return EvalItem(rid, [image], text, string.ascii_uppercase[answer], choices, meta, f"{entry.file}:{entry.line}")


def _test_pids(path: Path) -> list[Any]:
    for entry in json_entries(path):
        if entry.key == "test":
            if not isinstance(entry.value, list):
                raise entry.error("test", "expected a list of problem ids")
            return entry.value
    raise DataError(str(path), 1, None, "test", "missing field")


class SEEDBenchImageTask(MultipleChoiceTask):
    """SEED-Bench questions of types 1-9 (images); prompt ``\\nQuestion: ...\\nOptions: ...``."""

    name = "seed-bench-img"

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if data.suffix == ".jsonl":
            root = Path(image_root) if image_root is not None else data.parent
            return collect(jsonl_entries(data), lambda e: self._jsonl_item(e, root), skip_bad)
        root = Path(image_root) if image_root is not None else data.parent / "SEED-Bench-image"
        return collect(json_entries(data, "questions"), lambda e: self._question_item(e, root), skip_bad)

    def _question_item(self, entry: Entry, root: Path) -> EvalItem | None:
        qid = record_id(entry, "question_id")
        if field(entry, "question_type_id", int, qid) not in SEED_IMAGE_TYPES:
            return None
        question = field(entry, "question", str, qid)
        choices = [field(entry, name, str, qid) for name in _SEED_CHOICES]
        answer = _answer_letter(entry, qid)
        path = image_file(entry, "data_id", root, qid)
        text = f"\nQuestion: {question}\nOptions: {options_text(choices)}"
        meta = {"category": entry.value["question_type_id"]}
        return EvalItem(qid, [path], text, answer, choices, meta, f"{entry.file}:{entry.line}")

    def _jsonl_item(self, entry: Entry, root: Path) -> EvalItem:
        qid = record_id(entry, "question_id")
        prompt = field(entry, "prompt", str, qid)
        match = _QWEN_SEED_PROMPT.fullmatch(prompt)
        if match is None:
            raise entry.error("prompt", "expected '<img>path</img>...\\nAnswer:'", qid)
        path = image_file(entry, "prompt", root, qid, what=match.group(1))
        text = "\n" + match.group(2)
        return EvalItem(qid, [path], text, _answer_letter(entry, qid), None, {}, f"{entry.file}:{entry.line}")


def _answer_letter(entry: Entry, qid: str) -> str:
    answer = field(entry, "answer", str, qid).strip().upper()
    if answer not in "ABCD" or len(answer) != 1:
        raise entry.error("answer", f"expected a letter A-D, got {entry.value['answer']!r}", qid)
    return answer


class ScienceQAImgLikelihoodTask(ScienceQAImgTask):
    """ScienceQA-IMG scored as Qwen-VL does: lowest average loss over the option letters."""

    name = "scienceqa-img-likelihood"
    likelihood = True


class SEEDBenchImageLikelihoodTask(SEEDBenchImageTask):
    """SEED-Bench (image) scored as Qwen-VL does: lowest average loss over the option letters."""

    name = "seed-bench-img-likelihood"
    likelihood = True


TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (ScienceQAImgTask, ScienceQAImgLikelihoodTask, SEEDBenchImageTask, SEEDBenchImageLikelihoodTask)
}
