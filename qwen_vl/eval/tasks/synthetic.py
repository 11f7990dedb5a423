"""The synthetic "shapes world" (``qwen_vl.data.synthetic``): held-out scenes, every kind of question.

Files expected (``data``): a folder written by ``qwen-vl synth`` (or its ``truth.jsonl``);
pictures resolve against ``image_root``, by default the folder of ``truth.jsonl``. One item
per record: its first question (the runner asks single questions, without history), so a
``multiturn`` record is scored on its first turn, under that turn's kind.

Prompts: chat ``Picture 1: <img>{image}</img>\\n{question}`` (``Picture 2: ...`` too for
two pictures), exactly as in ``data.json``; base ``<img>{image}</img>{question} Answer:``.

Answers are read back from the generator's templates, in English or Chinese whatever the
question's language, tolerant of case, articles, spaces and punctuation; an answer that
cannot be read scores 0. Metrics (percentages) per kind, each also per language
(``<metric>.en``, ``<metric>.zh``; None when there is no item): ``grounding_acc@0.5`` (IoU
of the first box with the truth, both 0-1000), ``colour_acc``, ``shape_acc``,
``position_acc``, ``count_acc``, ``yesno_acc``, ``identify_acc``, ``ocr_exact`` (the words,
in order, case-insensitive), ``caption_exact_set`` (the multiset of (colour, shape) pairs
named equals the truth), ``find_all_acc`` (every object found: a box with IoU >= 0.5 and
the right label each, no extra box), ``difference_acc``; ``accuracy`` over all items, its
``.en`` / ``.zh``, and ``en_zh_gap`` (English minus Chinese, points). Both ``mode``s score
the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...data.conversations import COLOUR_WORDS, KINDS, LANGS, SHAPE_WORDS, SINGLE_IMAGE_KINDS
from ...grounding import Box, parse_grounding
from ..metrics.boxes import HIT_IOU, box_iou, parse_box
from ..metrics.scores import check_lengths, check_mode
from .base import EvalItem, PromptStyle, ReadResult, Task
from .reading import Entry, collect, field, image_file, jsonl_entries, percent, record_id

TRUTH_FILE = "truth.jsonl"
#: The metric of each kind of question.
METRICS: dict[str, str] = {
    "ground": "grounding_acc@0.5",
    "colour": "colour_acc",
    "shape": "shape_acc",
    "position": "position_acc",
    "count": "count_acc",
    "yesno": "yesno_acc",
    "identify": "identify_acc",
    "ocr": "ocr_exact",
    "caption": "caption_exact_set",
    "find_all": "find_all_acc",
    "difference": "difference_acc",
}

Pair = tuple[str, str]


# ----- reading answers back ----------------------------------------------------------------
def _alternation(words: dict[str, str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOUR_OF = {w[lang].lower(): c for c, w in COLOUR_WORDS.items() for lang in LANGS} | {"粉红色": "pink"}
_SHAPE_OF = {w[key].lower(): s for s, w in SHAPE_WORDS.items() for key in ("en", "plural", "zh")}
_COLOUR = f"(?<![a-z])({_alternation(_COLOUR_OF)})(?![a-z])"
_SHAPE = f"(?<![a-z])({_alternation(_SHAPE_OF)})(?![a-z])"
_COLOUR_RE = re.compile(_COLOUR, re.I)
_SHAPE_RE = re.compile(_SHAPE, re.I)
_PAIR_RE = re.compile(_COLOUR + r"\s*(?:的\s*)?" + _SHAPE, re.I)
_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_CHINESE_NUMBERS = {c: i for i, c in enumerate("零一二三四五六七八九十")} | {"两": 2, "〇": 0}
_INTEGER_RE = re.compile(r"\d+")
_NUMBER_WORD_RE = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.I)
_WORD_RE = re.compile(r"[A-Za-z]+")
_DIFFERENCE_WORDS = {
    "removed": re.compile(r"\b(gone|removed|missing|disappeared)\b|不见|消失|没有了|移除", re.I),
    "added": re.compile(r"\b(added|appeared|new)\b|多了|添加|增加|新增", re.I),
    "moved": re.compile(r"\b(moved)\b|移动|移到|挪", re.I),
}


def colours_in(text: str) -> list[str]:
    """The colours named in ``text`` (English or Chinese), in order."""
    return [_COLOUR_OF[m.group(1).lower()] for m in _COLOUR_RE.finditer(text)]


def shapes_in(text: str) -> list[str]:
    """The shapes named in ``text`` (singular, plural or Chinese), in order."""
    return [_SHAPE_OF[m.group(1).lower()] for m in _SHAPE_RE.finditer(text)]


def pairs_in(text: str) -> list[Pair]:
    """``(colour, shape)`` of every ``red circle`` / ``红色的圆形`` in ``text``, in order."""
    return [(_COLOUR_OF[m.group(1).lower()], _SHAPE_OF[m.group(2).lower()]) for m in _PAIR_RE.finditer(text)]


def _only(values: Sequence[Any]) -> Any | None:
    """The one distinct value of ``values``, or None (none, or several different)."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def read_count(text: str) -> int | None:
    """The first number of ``text``: digits, an English number word or a Chinese numeral."""
    found = [(m.start(), int(m.group())) for m in _INTEGER_RE.finditer(text)][:1]
    found += [(m.start(), _NUMBER_WORDS[m.group(1).lower()]) for m in _NUMBER_WORD_RE.finditer(text)][:1]
    found += [(i, _CHINESE_NUMBERS[c]) for i, c in enumerate(text) if c in _CHINESE_NUMBERS][:1]
    return min(found)[1] if found else None


def read_yes_no(text: str) -> str | None:
    """``"yes"`` / ``"no"`` from the start of the answer (``Yes.``, ``no``, ``有。``, ``没有。``)."""
    head = text.strip().lstrip("\"'“‘「(（ ").lower()
    match = re.match(r"(yes|no)\b", head)
    if match:
        return match.group(1)
    if head.startswith(("没", "不", "否")):
        return "no"
    if head.startswith(("有", "是", "对")):
        return "yes"
    return None


_ROWS = (({"top", "upper"}, "上", "top"), ({"bottom", "lower"}, "下", "bottom"))
_COLUMNS = (({"left"}, "左", "left"), ({"right"}, "右", "right"))


def read_position(text: str) -> str | None:
    """The cell of ``conversations.POSITIONS`` named (``Top left.``, ``On the right.``, ``中间。``); None if unclear."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    row = [name for english, chinese, name in _ROWS if words & english or chinese in text]
    column = [name for english, chinese, name in _COLUMNS if words & english or chinese in text]
    if len(row) > 1 or len(column) > 1:
        return None
    if row or column:
        return " ".join(row + column)
    return "centre" if words & {"centre", "center", "middle"} or "中" in text else None


def read_words(text: str) -> list[str]:
    """The Latin words of ``text``, upper-cased, in order (punctuation and spacing ignored)."""
    return [w.upper() for w in _WORD_RE.findall(text)]


def read_difference(text: str) -> dict[str, str] | None:
    """``{"type", "colour", "shape"(, "new_colour")}`` stated by a difference answer, or None."""
    types = [t for t, pattern in _DIFFERENCE_WORDS.items() if pattern.search(text)]
    pairs = list(_PAIR_RE.finditer(text))
    if not pairs or len(types) > 1:
        return None
    first = pairs[0]
    colour, shape = _COLOUR_OF[first.group(1).lower()], _SHAPE_OF[first.group(2).lower()]
    if types:
        if _only(pairs_in(text)) is None:
            return None
        return {"type": types[0], "colour": colour, "shape": shape}
    after = colours_in(text[first.end() :])
    if len(pairs) != 1 or len(after) != 1:
        return None
    return {"type": "colour", "colour": colour, "shape": shape, "new_colour": after[0]}


def _found_objects(text: str) -> list[tuple[Pair | None, Box | None]]:
    """Label and box of each ``<ref>…</ref><box>…</box>`` of a find-all answer (None where unreadable)."""
    out: list[tuple[Pair | None, Box | None]] = []
    for obj in parse_grounding(text).objects:
        pair = _only(pairs_in(obj.label)) if obj.label else None
        out.append((pair, obj.box.ordered() if isinstance(obj.box, Box) else None))
    return out


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    return box_iou(tuple(map(float, a)), tuple(map(float, b)))  # type: ignore[arg-type]


def all_found(text: str, truth: Sequence[dict[str, Any]]) -> bool:
    """Every true object matched by its own predicted box (IoU >= 0.5, right label), no extra box."""
    found = _found_objects(text)
    if len(found) != len(truth):
        return False
    unused = set(range(len(found)))
    for obj in truth:
        pair = (obj["colour"], obj["shape"])
        hits = []
        for i in unused:
            label, box = found[i]
            iou = _iou(obj["box"], (box.x1, box.y1, box.x2, box.y2)) if label == pair and box else 0.0
            if iou >= HIT_IOU:
                hits.append((iou, i))
        if not hits:
            return False
        unused.remove(max(hits)[1])
    return True


def is_correct(kind: str, target: dict[str, Any], prediction: Any) -> bool:
    """Whether ``prediction`` (a model's answer) states ``target`` (a turn's truth) for ``kind``; never raises."""
    text = prediction if isinstance(prediction, str) else "" if prediction is None else str(prediction)
    if kind == "caption":
        return Counter(pairs_in(text)) == Counter(tuple(p) for p in target["objects"])
    if kind == "colour":
        return _only(colours_in(text)) == target["colour"]
    if kind == "shape":
        return _only(shapes_in(text)) == target["shape"]
    if kind == "position":
        return read_position(text) == target["position"]
    if kind == "count":
        return read_count(text) == target["count"]
    if kind == "yesno":
        return read_yes_no(text) == target["answer"]
    if kind == "ground":
        box = parse_box(text)
        return box is not None and _iou(target["box"], box) >= HIT_IOU  # type: ignore[arg-type]
    if kind == "identify":
        return _only(pairs_in(text)) == (target["colour"], target["shape"])
    if kind == "find_all":
        return all_found(text, target["objects"])
    if kind == "ocr":
        return read_words(text) == [w.upper() for w in target["words"]]
    if kind == "difference":
        keys = ("type", "colour", "shape", "new_colour") if target["type"] == "colour" else ("type", "colour", "shape")
        return read_difference(text) == {k: target[k] for k in keys}
    raise ValueError(f"unknown kind {kind!r}")


# ----- the task ----------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float | None:
    return percent(sum(values) / len(values)) if values else None


def synthetic_scores(items: Sequence[EvalItem], correct: Sequence[float]) -> dict[str, Any]:
    """The summary of per-item results (1.0 / 0.0): overall, per kind and per language."""
    check_lengths("items", items, "correct", correct)
    langs = [item.meta["lang"] for item in items]
    out: dict[str, Any] = {"accuracy": _mean(correct)}
    for lang in LANGS:
        out[f"accuracy.{lang}"] = _mean([c for c, g in zip(correct, langs) if g == lang])
    en, zh = out["accuracy.en"], out["accuracy.zh"]
    out["en_zh_gap"] = en - zh if en is not None and zh is not None else None
    for kind, metric in METRICS.items():
        mine = [(c, g) for c, item, g in zip(correct, items, langs) if item.meta["kind"] == kind]
        out[metric] = _mean([c for c, _ in mine])
        for lang in LANGS:
            out[f"{metric}.{lang}"] = _mean([c for c, g in mine if g == lang])
    out["count"] = len(items)
    return out


class SyntheticTask(Task):
    """Every kind of question of a generated shapes-world folder (see the module docstring)."""

    name = "synthetic"
    family = "synthetic"
    metric = "accuracy"
    max_new_tokens = 192  # the longest answers (find-all, 6 objects, Chinese) are about 155 tokens

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        path = data / TRUTH_FILE if data.is_dir() else data
        root = Path(image_root) if image_root is not None else path.parent
        return collect(jsonl_entries(path), lambda entry: self._item(entry, root), skip_bad)

    def _item(self, entry: Entry, root: Path) -> EvalItem:
        rid = record_id(entry, "id")
        kind, lang = field(entry, "kind", str, rid), field(entry, "lang", str, rid)
        if kind not in KINDS:
            raise entry.error("kind", f"unknown kind {kind!r}", rid)
        if lang not in LANGS:
            raise entry.error("lang", f"unknown language {lang!r}", rid)
        names = field(entry, "images", list, rid)
        if not names or not all(isinstance(n, str) for n in names):
            raise entry.error("images", "expected a non-empty list of paths", rid)
        turns = field(entry, "turns", list, rid)
        turn = turns[0] if turns else None
        if not isinstance(turn, dict):
            raise entry.error("turns", "expected a non-empty list of turns", rid)
        if turn.get("kind") not in (*SINGLE_IMAGE_KINDS, "difference"):
            raise entry.error("turns[0].kind", f"unknown kind {turn.get('kind')!r}", rid)
        if not isinstance(turn.get("question"), str) or not isinstance(turn.get("target"), dict):
            raise entry.error("turns[0]", "expected a 'question' string and a 'target' object", rid)
        images = [image_file(entry, "images", root, rid, what=name) for name in names]
        meta = {"kind": turn["kind"], "lang": lang, "record_kind": kind, "answer": turn.get("answer")}
        return EvalItem(rid, images, turn["question"], turn["target"], meta=meta, source=f"{entry.file}:{entry.line}")

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        if style == "base":
            return "".join(f"<img>{p}</img>" for p in item.images) + f"{item.question} Answer:"
        pictures = "".join(f"Picture {k}: <img>{p}</img>\n" for k, p in enumerate(item.images, start=1))
        return pictures + item.question

    def postprocess(self, response: str, item: EvalItem) -> str:
        """The reply as is (boxes and Chinese punctuation are read by the scorer)."""
        return response

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        check_mode(mode)
        check_lengths("predictions", predictions, "items", items)
        correct = [float(is_correct(item.meta["kind"], item.target, p)) for item, p in zip(items, predictions)]
        return synthetic_scores(items, correct)


TASKS: dict[str, type[Task]] = {"synthetic": SyntheticTask}
