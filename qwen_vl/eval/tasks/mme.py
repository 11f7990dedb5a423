"""MME: yes/no questions, two per image, over 14 subtasks -> acc, acc+, perception, cognition.

Files expected (``data``): the MME authors' release folder
(``MME_Benchmark_release_version/``) with one folder per subtask (``existence``,
``count``, ..., ``OCR``, ``commonsense_reasoning``, ..., ``code_reasoning``). A subtask
folder holds its questions in one of the two layouts of the release:

* ``images/<name>.jpg`` and ``questions_answers_YN/<name>.txt`` (artwork, celebrity,
  landmark, posters, scene);
* ``<name>.jpg`` (or ``.png``) and ``<name>.txt`` side by side (the others).

Each ``.txt`` has one question per line, ``question<TAB>Yes|No``. Folders that are not
MME subtasks are ignored. Items keep the release's order (subtasks, then files by name,
then lines), so consecutive items of a subtask are the pairs that the authors' script
scores for acc+. ``image_root`` is not used: images sit in the subtask folders.

Prompts: chat ``Picture 1: <img>{image}</img>\\n{question}`` (Qwen-VL's MME run, through
the chat template, with the chat model's default of 512 new tokens); base
``<img>{image}</img>{question} Answer:``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...finetune.records import DataError
from ..metrics.mme import COGNITION, PERCEPTION, MMEItem, mme_scores
from .base import EvalItem, PromptStyle, ReadResult, Task
from .reading import read_text

SUBTASKS = PERCEPTION + COGNITION
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
QUESTION_DIRS = ("questions_answers_YN", "questions_answer_YN")


class MMETask(Task):
    """MME (all subtasks found under ``data``)."""

    name = "mme"
    family = "mme"
    metric = "perception"
    max_new_tokens = 512

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if not data.is_dir():
            raise DataError(str(data), None, None, "", "MME release folder not found")
        folders = [data / s for s in SUBTASKS if (data / s).is_dir()]
        if not folders:
            raise DataError(
                str(data), None, None, "", f"no MME subtask folder (expected some of {', '.join(SUBTASKS)})"
            )
        result = ReadResult(items=[])
        for folder in folders:
            for text_file, image_dir in _question_files(folder):
                _read_file(folder.name, text_file, image_dir, result, skip_bad)
        return result

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        if style == "base":
            return f"<img>{item.images[0]}</img>{item.question} Answer:"
        return f"Picture 1: <img>{item.images[0]}</img>\n{item.question}"

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        """``perception`` (0..2000) and ``cognition`` (0..800) sums, then per subtask ``acc`` and
        ``acc+`` (percent) and ``score`` (``acc + acc+``, 0..200)."""
        answered = [
            MMEItem(item.meta["subtask"], item.meta["image"], item.target, str(prediction))
            for item, prediction in zip(items, predictions, strict=True)
        ]
        result = mme_scores(answered, mode)  # type: ignore[arg-type]
        scores: dict[str, Any] = {"perception": result.perception, "cognition": result.cognition, "count": len(items)}
        for name in SUBTASKS:
            if name in result.subtasks:
                sub = result.subtasks[name]
                scores[f"{name}/acc"] = 100 * sub.acc
                scores[f"{name}/acc+"] = 100 * sub.acc_plus
                scores[f"{name}/score"] = sub.score
        return scores


def _question_files(folder: Path) -> list[tuple[Path, Path]]:
    """``(question file, folder of its image)`` pairs of a subtask folder, by file name."""
    for name in QUESTION_DIRS:
        if (folder / name).is_dir():
            return [(f, folder / "images") for f in sorted((folder / name).glob("*.txt"))]
    return [(f, folder) for f in sorted(folder.glob("*.txt"))]


def _image_of(text_file: Path, image_dir: Path) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = image_dir / (text_file.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _read_file(subtask: str, text_file: Path, image_dir: Path, result: ReadResult, skip_bad: bool) -> None:
    file = str(text_file)
    image = _image_of(text_file, image_dir)
    for number, line in enumerate(read_text(text_file).splitlines(), start=1):
        if not line.strip():
            continue
        rid = f"{subtask}/{text_file.stem}#{number}"
        try:
            if image is None:
                raise DataError(file, number, rid, "image", f"no image {text_file.stem}.* in {image_dir}")
            question, answer = _parse_line(line, file, number, rid)
        except DataError as error:
            if not skip_bad:
                raise
            result.errors.append(error)
            continue
        meta = {"subtask": subtask, "image": image.name}
        result.items.append(EvalItem(rid, [str(image.resolve())], question, answer, None, meta, f"{file}:{number}"))


def _parse_line(line: str, file: str, number: int, rid: str) -> tuple[str, str]:
    fields = line.rstrip("\r").split("\t")
    if len(fields) < 2 or not fields[0].strip():
        raise DataError(file, number, rid, "question", "expected 'question<TAB>answer'")
    answer = fields[1].strip()
    if answer.lower() not in ("yes", "no"):
        raise DataError(file, number, rid, "answer", f"expected Yes or No, got {answer!r}")
    return fields[0].strip(), answer


TASKS: dict[str, type[Task]] = {MMETask.name: MMETask}
