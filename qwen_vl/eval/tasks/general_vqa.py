"""General VQA: VQAv2 (val, test-dev), OK-VQA val, VizWiz val (VQA accuracy), GQA test-dev
balanced (exact match).

Files expected (as the benchmarks distribute them; ``data`` is the file, or for VQAv2 and
OK-VQA also the folder holding the questions and annotations files):

* VQAv2 val: ``v2_OpenEnded_mscoco_val2014_questions.json`` and, beside it,
  ``v2_mscoco_val2014_annotations.json``; images ``<image_root>/val2014/COCO_val2014_<12-digit
  image id>.jpg`` (``image_root`` defaults to the folder of the questions file).
* VQAv2 test-dev: ``v2_OpenEnded_mscoco_test-dev2015_questions.json``; images
  ``<image_root>/test2015/COCO_test2015_<id>.jpg``. No public answers: ``score`` reports none.
* OK-VQA val: ``OpenEnded_mscoco_val2014_questions.json`` and ``mscoco_val2014_annotations.json``;
  COCO ``val2014`` images as for VQAv2.
* VizWiz val: ``Annotations/val.json`` (a list of ``{"image", "question", "answers", ...}``);
  images ``<image_root>/<image>``, ``image_root`` defaulting to ``val/`` beside ``Annotations/``.
* GQA test-dev balanced: ``testdev_balanced_questions.json`` (an object of question id ->
  ``{"imageId", "question", "answer", ...}``); images ``<image_root>/<imageId>.jpg``,
  ``image_root`` defaulting to ``images/`` beside the file.

Qwen-VL's preprocessed JSONL (``data`` ending in ``.jsonl``; one ``{"image", "question",
"question_id", "answer"}`` per line, ``image`` relative to ``image_root``, default the file's
folder) is read too. For VQA accuracy an item needs its human answers: a list in
``answer`` (or ``answers``), else the benchmark's annotations file beside the JSONL supplies them.

Prompts: base ``<img>{image}</img>{question} Answer:`` (Qwen-VL's ``evaluate_vqa.py``); chat
``Picture 1: <img>{image}</img>\\n{question}\\nAnswer the question using a single word or phrase.``
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..metrics.exact import gqa_accuracy
from ..metrics.scores import Scores, check_lengths, check_mode
from ..metrics.vqa import vqa_scores
from .base import EvalItem, PromptStyle, ReadResult, Task
from .reading import Entry, collect, field, image_file, json_entries, jsonl_entries, percent, record_id, strings

SHORT_ANSWER = "Answer the question using a single word or phrase."


def short_answer_prompt(item: EvalItem, style: PromptStyle) -> str:
    """``<img>{image}</img>{question} Answer:`` (base) or the chat query asking for a short answer."""
    if style == "base":
        return f"<img>{item.images[0]}</img>{item.question} Answer:"
    if style == "chat":
        return f"Picture 1: <img>{item.images[0]}</img>\n{item.question}\n{SHORT_ANSWER}"
    raise ValueError(f"prompt style must be 'base' or 'chat', got {style!r}")


def check_predictions(items: Sequence[EvalItem], predictions: Sequence[Any], mode: str) -> list[str]:
    """The predictions as strings, after checking the mode and that there is one per item."""
    check_mode(mode)
    check_lengths("items", items, "predictions", predictions)
    return [p if isinstance(p, str) else str(p) for p in predictions]


def scores_by(metric: str, items: Sequence[EvalItem], scores: Scores, key: str) -> dict[str, Any]:
    """``{metric: mean %, "count": n, "metric[<meta[key]>]": mean % per group}``."""
    out: dict[str, Any] = {metric: percent(scores.mean), "count": len(items)}
    groups: dict[str, list[float]] = {}
    for item, value in zip(items, scores.per_item):
        if key in item.meta:
            groups.setdefault(str(item.meta[key]), []).append(value)
    for name in sorted(groups):
        out[f"{metric}[{name}]"] = percent(sum(groups[name]) / len(groups[name]))
    return out


def jsonl_item(entry: Entry, root: Path, answers: Callable[[Entry, str], Any]) -> EvalItem:
    """An item of Qwen-VL's preprocessed JSONL: ``image``, ``question``, ``question_id``; the
    target from ``answers(entry, id)``."""
    rid = record_id(entry, "question_id")
    return EvalItem(
        id=rid,
        images=[image_file(entry, "image", root, rid)],
        question=field(entry, "question", str, rid),
        target=answers(entry, rid),
        source=f"{entry.file}:{entry.line}",
    )


class VQAv2Val(Task):
    """VQAv2 val (see the module docstring for the files); VQA accuracy with per-answer-type scores."""

    name = "vqav2-val"
    family = "general_vqa"
    metric = "vqa_accuracy"
    max_new_tokens = 10
    questions_file = "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations_file: str | None = "v2_mscoco_val2014_annotations.json"
    image_pattern = "val2014/COCO_val2014_{:012d}.jpg"

    def _files(self, data: Path) -> tuple[Path, Path | None]:
        questions = data / self.questions_file if data.is_dir() else data
        annotations = None if self.annotations_file is None else questions.parent / self.annotations_file
        return questions, annotations

    def _annotations(self, path: Path) -> dict[str, tuple[list[dict[str, Any]], Any]]:
        """Question id -> (answer dicts as in the file: ``answer``, ``answer_id``, ...; answer type)."""
        out: dict[str, tuple[list[dict[str, Any]], Any]] = {}
        for entry in json_entries(path, "annotations"):
            rid = record_id(entry, "question_id")
            answers = field(entry, "answers", list, rid)
            for i, answer in enumerate(answers):
                if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
                    raise entry.error(f"answers[{i}].answer", "expected an object with a string 'answer'", rid)
            if not answers:
                raise entry.error("answers", "empty list", rid)
            out[rid] = (answers, entry.value.get("answer_type"))
        return out

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if data.suffix == ".jsonl":
            return self._read_jsonl(data, image_root, skip_bad)
        questions, annotations_path = self._files(data)
        annotations = None if annotations_path is None else self._annotations(annotations_path)
        root = Path(image_root) if image_root is not None else questions.parent

        def build(entry: Entry) -> EvalItem:
            rid = record_id(entry, "question_id")
            image_id = field(entry, "image_id", int, rid)
            target, meta = None, {"image_id": image_id}
            if annotations is not None:
                if rid not in annotations:
                    raise entry.error("question_id", f"no annotation for this question in {annotations_path}", rid)
                target, answer_type = annotations[rid]
                if answer_type is not None:
                    meta["answer_type"] = answer_type
            path = image_file(entry, "image_id", root, rid, self.image_pattern.format(image_id))
            question = field(entry, "question", str, rid)
            return EvalItem(rid, [path], question, target, meta=meta, source=f"{entry.file}:{entry.line}")

        return collect(json_entries(questions, "questions"), build, skip_bad)

    def _read_jsonl(self, data: Path, image_root: Path | None, skip_bad: bool) -> ReadResult:
        beside = None if self.annotations_file is None else data.parent / self.annotations_file
        annotations = self._annotations(beside) if beside is not None and beside.is_file() else None

        def answers(entry: Entry, rid: str) -> Any:
            if self.annotations_file is None:
                return None
            for name in ("answers", "answer"):
                if isinstance(entry.value.get(name), list):
                    return strings(entry, name, rid)
            if annotations is not None and rid in annotations:
                return annotations[rid][0]
            raise entry.error(
                "answer", f"VQA accuracy needs the human answers: a list here, or {self.annotations_file} beside", rid
            )

        root = Path(image_root) if image_root is not None else data.parent
        return collect(jsonl_entries(data), lambda e: jsonl_item(e, root, answers), skip_bad)

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        return short_answer_prompt(item, style)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        preds = check_predictions(items, predictions, mode)
        if self.annotations_file is None or any(item.target is None for item in items):
            return {
                self.metric: None,
                "count": len(items),
                "note": "no public answers: submit to the evaluation server",
            }
        scores = vqa_scores(preds, [item.target for item in items], mode)
        return scores_by(self.metric, items, scores, "answer_type")


class VQAv2TestDev(VQAv2Val):
    """VQAv2 test-dev: questions only (answers are scored by the EvalAI server)."""

    name = "vqav2-testdev"
    questions_file = "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    annotations_file = None
    image_pattern = "test2015/COCO_test2015_{:012d}.jpg"


class OKVQAVal(VQAv2Val):
    """OK-VQA val: the VQA questions/annotations format over COCO val2014 images."""

    name = "okvqa-val"
    questions_file = "OpenEnded_mscoco_val2014_questions.json"
    annotations_file = "mscoco_val2014_annotations.json"


class VizWizVal(VQAv2Val):
    """VizWiz VQA val: ``Annotations/val.json`` and the ``val/`` images; VQA accuracy."""

    name = "vizwiz-val"
    annotations_file = "vizwiz_val_annotations.json"  # Qwen-VL's converted file, only for JSONL input

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if data.suffix == ".jsonl":
            return self._read_jsonl(data, image_root, skip_bad)
        root = Path(image_root) if image_root is not None else data.parent.parent / "val"

        def build(entry: Entry) -> EvalItem:
            rid = field(entry, "image", str)
            answers = field(entry, "answers", list, rid)
            texts = []
            for i, answer in enumerate(answers):
                if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
                    raise entry.error(f"answers[{i}].answer", "expected an object with a string 'answer'", rid)
                texts.append(answer["answer"])
            if not texts:
                raise entry.error("answers", "empty list", rid)
            meta = {"answer_type": entry.value["answer_type"]} if "answer_type" in entry.value else {}
            path = image_file(entry, "image", root, rid)
            question = field(entry, "question", str, rid)
            return EvalItem(rid, [path], question, texts, meta=meta, source=f"{entry.file}:{entry.line}")

        return collect(json_entries(data), build, skip_bad)


class GQATestDev(Task):
    """GQA test-dev balanced (see the module docstring for the files); exact match."""

    name = "gqa-testdev"
    family = "general_vqa"
    metric = "accuracy"
    max_new_tokens = 10

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if data.suffix == ".jsonl":
            root = Path(image_root) if image_root is not None else data.parent
            return collect(jsonl_entries(data), lambda e: jsonl_item(e, root, answer_field), skip_bad)
        root = Path(image_root) if image_root is not None else data.parent / "images"

        def build(entry: Entry) -> EvalItem:
            rid = str(entry.key)
            image_id = field(entry, "imageId", str, rid)
            path = image_file(entry, "imageId", root, rid, f"{image_id}.jpg")
            question = field(entry, "question", str, rid)
            target = field(entry, "answer", str, rid)
            meta = {"image_id": image_id}
            types = entry.value.get("types")
            if isinstance(types, dict) and isinstance(types.get("structural"), str):
                meta["structural"] = types["structural"]
            return EvalItem(rid, [path], question, target, meta=meta, source=f"{entry.file}:{entry.line}")

        return collect(json_entries(data), build, skip_bad)

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        return short_answer_prompt(item, style)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        preds = check_predictions(items, predictions, mode)
        scores = gqa_accuracy(preds, [item.target for item in items], mode)  # type: ignore[arg-type]
        return scores_by(self.metric, items, scores, "structural")


def answer_field(entry: Entry, rid: str) -> str | list[str]:
    """The ``answer`` field: one string or a list of accepted strings."""
    value = field(entry, "answer", (str, list), rid)
    return value if isinstance(value, str) else strings(entry, "answer", rid)


TASKS: dict[str, type[Task]] = {task.name: task for task in (VQAv2Val, VQAv2TestDev, OKVQAVal, VizWizVal, GQATestDev)}
