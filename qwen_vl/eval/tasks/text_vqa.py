"""Text-oriented VQA: TextVQA val (VQA accuracy), DocVQA val (ANLS), ChartQA test (relaxed
accuracy), AI2D test (multiple choice), OCR-VQA (exact match).

Files expected (as the benchmarks distribute them):

* TextVQA val: ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "question", "image_id",
  "answers", ...}]}``); images ``<image_root>/train_images/<image_id>.jpg`` (``image_root``
  defaults to the file's folder; val images ship in ``train_val_images.zip``).
* DocVQA val: ``val_v1.0.json`` or ``val_v1.0_withQT.json`` (``{"data": [{"questionId",
  "question", "image", "answers", ...}]}``); images ``<image_root>/<image>`` (``documents/...``),
  ``image_root`` defaulting to the file's folder.
* ChartQA test: ``test_human.json`` / ``test_augmented.json`` (a list of ``{"imgname", "query",
  "label"}``); images ``<image_root>/<imgname>``, ``image_root`` defaulting to ``png/`` beside the file.
* AI2D test: the ``ai2d/`` folder (``data``) with ``ai2d_test_ids.csv`` (one image id a line),
  ``questions/<id>.png.json`` (``{"imageName", "questions": {text: {"answerTexts",
  "correctAnswer", "questionId", ...}}}``) and ``images/<id>.png``.
* OCR-VQA test (and val): ``dataset.json`` (an object of book id -> ``{"imageURL", "questions",
  "answers", "split", ...}``, split 1 train, 2 val, 3 test); images ``<image_root>/<book
  id><extension of imageURL>``, ``image_root`` defaulting to ``images/`` beside the file (where
  the benchmark's download script saves them).

Each also reads Qwen-VL's preprocessed JSONL (``data`` ending in ``.jsonl``: ``{"image",
"question", "question_id", "answer"}`` a line, ``image`` relative to ``image_root``, default the
file's folder). TextVQA's JSONL takes its answers from a list in ``answer`` or from Qwen-VL's
``textvqa_val_annotations.json`` beside it.

Prompts: base ``<img>{image}</img>{question} Answer:`` (Qwen-VL's ``evaluate_vqa.py``); chat
``Picture 1: <img>{image}</img>\\n{question}`` and a request for a short answer (for AI2D, for
the option's letter).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...finetune.records import DataError
from ..metrics.anls import anls_scores
from ..metrics.choice import parse_choice
from ..metrics.exact import exact_match, exact_match_accuracy
from ..metrics.relaxed import relaxed_accuracy
from ..metrics.scores import scores_of
from .base import EvalItem, PromptStyle, ReadResult, Task
from .general_vqa import VQAv2Val, answer_field, check_predictions, jsonl_item, short_answer_prompt
from .reading import (
    Entry,
    collect,
    field,
    image_file,
    json_entries,
    jsonl_entries,
    percent,
    read_text,
    record_id,
    strings,
)

LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


class _ShortAnswerTask(Task):
    """A single-image question with a short answer; Qwen-VL's JSONL read as is."""

    family = "text_vqa"

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if data.suffix == ".jsonl":
            root = Path(image_root) if image_root is not None else data.parent
            return collect(jsonl_entries(data), lambda e: jsonl_item(e, root, answer_field), skip_bad)
        return self.read_native(data, image_root, skip_bad)

    def read_native(self, data: Path, image_root: Path | None, skip_bad: bool) -> ReadResult:
        """Items of the benchmark's own file layout."""
        raise NotImplementedError

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        return short_answer_prompt(item, style)


def _targets(items: Sequence[EvalItem]) -> list[list[str]]:
    return [[item.target] if isinstance(item.target, str) else list(item.target) for item in items]


class TextVQAVal(VQAv2Val):
    """TextVQA val (see the module docstring for the files); VQA accuracy as Qwen-VL computes it."""

    name = "textvqa-val"
    family = "text_vqa"
    annotations_file = "textvqa_val_annotations.json"  # Qwen-VL's converted file, only for JSONL input

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if data.suffix == ".jsonl":
            return self._read_jsonl(data, image_root, skip_bad)
        root = Path(image_root) if image_root is not None else data.parent

        def build(entry: Entry) -> EvalItem:
            rid = record_id(entry, "question_id")
            image_id = field(entry, "image_id", str, rid)
            path = image_file(entry, "image_id", root, rid, f"train_images/{image_id}.jpg")
            question = field(entry, "question", str, rid)
            answers = strings(entry, "answers", rid)
            meta = {"image_id": image_id}
            return EvalItem(rid, [path], question, answers, meta=meta, source=f"{entry.file}:{entry.line}")

        return collect(json_entries(data, "data"), build, skip_bad)


class DocVQAVal(_ShortAnswerTask):
    """DocVQA val (see the module docstring for the files); ANLS."""

    name = "docvqa-val"
    metric = "anls"
    max_new_tokens = 100

    def read_native(self, data: Path, image_root: Path | None, skip_bad: bool) -> ReadResult:
        root = Path(image_root) if image_root is not None else data.parent

        def build(entry: Entry) -> EvalItem:
            rid = record_id(entry, "questionId")
            path = image_file(entry, "image", root, rid)
            question = field(entry, "question", str, rid)
            answers = strings(entry, "answers", rid)
            return EvalItem(rid, [path], question, answers, source=f"{entry.file}:{entry.line}")

        return collect(json_entries(data, "data"), build, skip_bad)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        preds = check_predictions(items, predictions, mode)
        scores = anls_scores(preds, _targets(items), mode)  # type: ignore[arg-type]
        return {self.metric: percent(scores.mean), "count": len(items)}


class ChartQAHuman(_ShortAnswerTask):
    """ChartQA test, human-written questions (see the module docstring); relaxed accuracy."""

    name = "chartqa-test-human"
    metric = "relaxed_accuracy"
    max_new_tokens = 100
    file_name = "test_human.json"

    def read_native(self, data: Path, image_root: Path | None, skip_bad: bool) -> ReadResult:
        data = data / self.file_name if data.is_dir() else data
        root = Path(image_root) if image_root is not None else data.parent / "png"

        def build(entry: Entry) -> EvalItem:
            rid = f"{data.stem}-{entry.index}"
            path = image_file(entry, "imgname", root, rid)
            question = field(entry, "query", str, rid)
            label = field(entry, "label", (str, int, float), rid)
            return EvalItem(rid, [path], question, str(label), source=f"{entry.file}:{entry.line}")

        return collect(json_entries(data), build, skip_bad)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        preds = check_predictions(items, predictions, mode)
        scores = relaxed_accuracy(preds, _targets(items), mode)  # type: ignore[arg-type]
        return {self.metric: percent(scores.mean), "count": len(items)}


class ChartQAAugmented(ChartQAHuman):
    """ChartQA test, machine-generated questions."""

    name = "chartqa-test-augmented"
    file_name = "test_augmented.json"


class OCRVQATest(_ShortAnswerTask):
    """OCR-VQA test split of ``dataset.json`` (see the module docstring); exact match."""

    name = "ocrvqa-test"
    metric = "accuracy"
    max_new_tokens = 100
    split = 3

    def read_native(self, data: Path, image_root: Path | None, skip_bad: bool) -> ReadResult:
        root = Path(image_root) if image_root is not None else data.parent / "images"
        result = ReadResult(items=[])

        def build(entry: Entry) -> list[EvalItem]:
            book = str(entry.key)
            if field(entry, "split", int, book) != self.split:
                return []
            url = field(entry, "imageURL", str, book)
            path = image_file(entry, "imageURL", root, book, book + Path(url).suffix)
            questions = strings(entry, "questions", book)
            answers = strings(entry, "answers", book)
            if len(answers) != len(questions):
                raise entry.error("answers", f"{len(answers)} answers for {len(questions)} questions", book)
            source = f"{entry.file}:{entry.line}"
            return [
                EvalItem(f"{book}-{i}", [path], q, a, meta={"book": book}, source=source)
                for i, (q, a) in enumerate(zip(questions, answers))
            ]

        for entry in json_entries(data):
            try:
                result.items.extend(build(entry))
            except DataError as error:
                if not skip_bad:
                    raise
                result.errors.append(error)
        return result

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        preds = check_predictions(items, predictions, mode)
        scores = exact_match_accuracy(preds, _targets(items))  # type: ignore[arg-type]
        return {self.metric: percent(scores.mean), "count": len(items)}


class OCRVQAVal(OCRVQATest):
    """OCR-VQA val split of ``dataset.json``."""

    name = "ocrvqa-val"
    split = 2


class AI2DTest(_ShortAnswerTask):
    """AI2D test (see the module docstring for the files); the answer letter, exact match.

    ``"canonical"`` reads the letter from the reply (``metrics.choice.parse_choice``);
    ``"qwen"`` needs the reply, stripped and lower-cased, to equal the target.
    """

    name = "ai2d-test"
    metric = "accuracy"
    max_new_tokens = 10

    def read_native(self, data: Path, image_root: Path | None, skip_bad: bool) -> ReadResult:
        ids_file = data / "ai2d_test_ids.csv"
        root = Path(image_root) if image_root is not None else data / "images"
        result = ReadResult(items=[])
        for number, line in enumerate(read_text(ids_file).splitlines(), start=1):
            image_id = line.strip().strip(",")
            if not image_id:
                continue
            questions = data / "questions" / f"{image_id}.png.json"
            try:
                if not questions.is_file():
                    raise DataError(str(ids_file), number, image_id, "", f"questions file not found: {questions}")
                entries = json_entries(questions, "questions")
            except DataError as error:
                if not skip_bad:
                    raise
                result.errors.append(error)
                continue
            read = collect(entries, lambda e, i=image_id: self._item(e, root, i), skip_bad)
            result.items.extend(read.items)
            result.errors.extend(read.errors)
        return result

    def _item(self, entry: Entry, root: Path, image_id: str) -> EvalItem:
        rid = record_id(entry, "questionId")
        options = strings(entry, "answerTexts", rid)
        if len(options) > len(string.ascii_uppercase):
            raise entry.error("answerTexts", f"at most 26 options, got {len(options)}", rid)
        correct = field(entry, "correctAnswer", int, rid)
        if not 0 <= correct < len(options):
            raise entry.error("correctAnswer", f"{correct} is not an index of the {len(options)} options", rid)
        path = image_file(entry, "questionId", root, rid, f"{image_id}.png")
        letter = string.ascii_uppercase[correct]
        return EvalItem(
            rid, [path], str(entry.key), letter, options, {"image_id": image_id}, f"{entry.file}:{entry.line}"
        )

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        if not item.options:
            return short_answer_prompt(item, style)
        lines = [item.question] + [f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(item.options)]
        question = "\n".join(lines)
        if style == "base":
            return f"<img>{item.images[0]}</img>{question}\nAnswer:"
        if style == "chat":
            return f"Picture 1: <img>{item.images[0]}</img>\n{question}\n{LETTER_ANSWER}"
        raise ValueError(f"prompt style must be 'base' or 'chat', got {style!r}")

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        preds = check_predictions(items, predictions, mode)
        per_item = []
        for item, pred in zip(items, preds):
            if mode == "canonical" and item.options:
                per_item.append(float(parse_choice(pred, item.options) == item.target))
            else:
                per_item.append(exact_match(pred, item.target))
        return {self.metric: percent(scores_of(per_item).mean), "count": len(items)}


TASKS: dict[str, type[Task]] = {
    task.name: task for task in (TextVQAVal, DocVQAVal, ChartQAHuman, ChartQAAugmented, AI2DTest, OCRVQATest, OCRVQAVal)
}
