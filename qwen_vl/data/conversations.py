"""Questions and answers about a scene, in English and Chinese, from fixed templates.

Each kind of question has one answer template per language, short enough for a tiny model
to learn and regular enough for the scorer (``qwen_vl.eval.tasks.synthetic``) to read back.
A question only refers to an object by its colour and shape when that pair is unique in
the scene; builders return None when the scene does not allow the kind.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..grounding.objects import Box
from ..grounding.parse import format_box
from ..grounding.prompts import chat_grounding_prompt, chat_region_prompt
from .scenes import COLOURS, SHAPES, Scene, SceneObject, Word, describable, normalised_box

LANGS: tuple[str, ...] = ("en", "zh")
SINGLE_IMAGE_KINDS: tuple[str, ...] = (
    "caption",
    "colour",
    "shape",
    "position",
    "count",
    "yesno",
    "ground",
    "identify",
    "find_all",
    "ocr",
)
KINDS: tuple[str, ...] = (*SINGLE_IMAGE_KINDS, "difference", "multiturn")

COLOUR_WORDS: dict[str, dict[str, str]] = {
    "red": {"en": "red", "zh": "红色"},
    "orange": {"en": "orange", "zh": "橙色"},
    "yellow": {"en": "yellow", "zh": "黄色"},
    "green": {"en": "green", "zh": "绿色"},
    "blue": {"en": "blue", "zh": "蓝色"},
    "purple": {"en": "purple", "zh": "紫色"},
    "pink": {"en": "pink", "zh": "粉色"},
    "black": {"en": "black", "zh": "黑色"},
}
SHAPE_WORDS: dict[str, dict[str, str]] = {
    "circle": {"en": "circle", "plural": "circles", "zh": "圆形"},
    "square": {"en": "square", "plural": "squares", "zh": "正方形"},
    "rectangle": {"en": "rectangle", "plural": "rectangles", "zh": "长方形"},
    "triangle": {"en": "triangle", "plural": "triangles", "zh": "三角形"},
    "star": {"en": "star", "plural": "stars", "zh": "星形"},
    "hexagon": {"en": "hexagon", "plural": "hexagons", "zh": "六边形"},
    "diamond": {"en": "diamond", "plural": "diamonds", "zh": "菱形"},
}
#: Cells of the 3 x 3 grid of box centres, row by row.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_ANSWERS: dict[str, dict[str, str]] = {
    "en": dict(
        zip(
            POSITIONS,
            (
                "Top left.",
                "At the top.",
                "Top right.",
                "On the left.",
                "In the centre.",
                "On the right.",
                "Bottom left.",
                "At the bottom.",
                "Bottom right.",
            ),
        )
    ),
    "zh": dict(
        zip(
            POSITIONS,
            ("左上方。", "上方。", "右上方。", "左边。", "中间。", "右边。", "左下方。", "下方。", "右下方。"),
        )
    ),
}
#: A centre closer than this (fraction of the side) to a grid line is not asked about.
GRID_CLEARANCE = 0.04

QUESTIONS: dict[str, dict[str, str]] = {
    "caption": {"en": "Describe the picture.", "zh": "描述这张图片。"},
    "colour": {"en": "What colour is the {shape}?", "zh": "{shape}是什么颜色？"},
    "shape": {"en": "What shape is the {colour} object?", "zh": "{colour}的物体是什么形状？"},
    "position": {"en": "Where is {object}?", "zh": "{object}在哪里？"},
    "count_all": {"en": "How many shapes are there?", "zh": "图中有几个形状？"},
    "count_shape": {"en": "How many {plural} are there?", "zh": "图中有几个{shape}？"},
    "count_colour": {"en": "How many {colour} shapes are there?", "zh": "图中有几个{colour}的形状？"},
    "yesno": {"en": "Is there {object}?", "zh": "图中有{object}吗？"},
    "identify": {"en": "What is in {region}?", "zh": "{region}里是什么？"},
    "find_all": {"en": "Find every shape.", "zh": "找出图中所有的形状。"},
    "ocr": {"en": "What is written in the picture?", "zh": "图中写了什么？"},
    "difference": {"en": "What is different in Picture 2?", "zh": "图2有什么不同？"},
}
YES_NO: dict[str, dict[bool, str]] = {"en": {True: "Yes.", False: "No."}, "zh": {True: "有。", False: "没有。"}}
DIFFERENCE_ANSWERS: dict[str, dict[str, str]] = {
    "en": {
        "colour": "The {object} is {new_colour}.",
        "removed": "The {object} is gone.",
        "added": "{an_object} was added.",
        "moved": "The {object} moved.",
    },
    "zh": {
        "colour": "{object}变成了{new_colour}。",
        "removed": "{object}不见了。",
        "added": "多了{an_object}。",
        "moved": "{object}移动了。",
    },
}


@dataclass(frozen=True)
class Turn:
    """One question and its answer; ``target`` is the structured truth the answer states."""

    kind: str
    question: str
    answer: str
    target: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "question": self.question, "answer": self.answer, "target": self.target}


# ----- phrases -----------------------------------------------------------------------------
def object_name(colour: str, shape: str, lang: str) -> str:
    """``red circle`` / ``红色的圆形``."""
    if lang == "en":
        return f"{COLOUR_WORDS[colour]['en']} {SHAPE_WORDS[shape]['en']}"
    return f"{COLOUR_WORDS[colour]['zh']}的{SHAPE_WORDS[shape]['zh']}"


def definite(colour: str, shape: str, lang: str) -> str:
    """``the red circle`` / ``红色的圆形``."""
    return ("the " if lang == "en" else "") + object_name(colour, shape, lang)


def indefinite(colour: str, shape: str, lang: str) -> str:
    """``a red circle``, ``an orange star`` / ``一个红色的圆形``."""
    name = object_name(colour, shape, lang)
    if lang == "en":
        return ("an " if name[0] in "aeiou" else "a ") + name
    return "一个" + name


def sentence(text: str, lang: str) -> str:
    """``text`` as a sentence: capitalised with a full stop (``。`` in Chinese)."""
    return text[:1].upper() + text[1:] + "." if lang == "en" else text + "。"


def listing(items: Sequence[str], lang: str) -> str:
    """``a, b and c`` / ``a、b和c``."""
    if len(items) == 1:
        return items[0]
    comma, conjunction = (", ", " and ") if lang == "en" else ("、", "和")
    return comma.join(items[:-1]) + conjunction + items[-1]


def caption_text(pairs: Sequence[tuple[str, str]], lang: str) -> str:
    """``A red circle, a blue square and a green star.`` for ``(colour, shape)`` pairs in order."""
    return sentence(listing([indefinite(c, s, lang) for c, s in pairs], lang), lang)


def reading_order(objects: Sequence[SceneObject]) -> list[int]:
    """Indices of ``objects`` left to right by box centre (top to bottom on ties)."""
    return sorted(range(len(objects)), key=lambda i: (objects[i].centre[0], objects[i].centre[1]))


def word_order(words: Sequence[Word]) -> list[Word]:
    """Words left to right; top to bottom when one is above the other (their columns overlap)."""
    if len(words) == 2 and words[0].box[0] < words[1].box[2] and words[1].box[0] < words[0].box[2]:
        return sorted(words, key=lambda w: w.box[1])
    return sorted(words, key=lambda w: (w.box[0], w.box[1]))


def grid_cell(obj: SceneObject, width: int, height: int) -> str | None:
    """The ``POSITIONS`` cell of the object's box centre, or None when the centre is within
    ``GRID_CLEARANCE`` of a grid line (too close to call)."""
    fx, fy = obj.centre[0] / width, obj.centre[1] / height
    if any(abs(f - line) < GRID_CLEARANCE for f in (fx, fy) for line in (1 / 3, 2 / 3)):
        return None
    column, row = min(int(fx * 3), 2), min(int(fy * 3), 2)
    return POSITIONS[3 * row + column]


# ----- one builder per kind ----------------------------------------------------------------
def _caption(scene: Scene, lang: str, rng: random.Random) -> Turn:
    pairs = [(scene.objects[i].colour, scene.objects[i].shape) for i in reading_order(scene.objects)]
    return Turn("caption", QUESTIONS["caption"][lang], caption_text(pairs, lang), {"objects": [list(p) for p in pairs]})


def _unique_by(scene: Scene, attribute: str, rng: random.Random) -> tuple[int, SceneObject] | None:
    """A random object whose ``attribute`` (shape or colour) no other object shares, or None."""
    counts = Counter(getattr(o, attribute) for o in scene.objects)
    candidates = [i for i, o in enumerate(scene.objects) if counts[getattr(o, attribute)] == 1]
    if not candidates:
        return None
    i = rng.choice(candidates)
    return i, scene.objects[i]


def _colour(scene: Scene, lang: str, rng: random.Random) -> Turn | None:
    picked = _unique_by(scene, "shape", rng)
    if picked is None:
        return None
    i, obj = picked
    question = QUESTIONS["colour"][lang].format(shape=SHAPE_WORDS[obj.shape][lang])
    answer = sentence(COLOUR_WORDS[obj.colour][lang], lang)
    return Turn("colour", question, answer, {"object": i, "shape": obj.shape, "colour": obj.colour})


def _shape(scene: Scene, lang: str, rng: random.Random) -> Turn | None:
    picked = _unique_by(scene, "colour", rng)
    if picked is None:
        return None
    i, obj = picked
    question = QUESTIONS["shape"][lang].format(colour=COLOUR_WORDS[obj.colour][lang])
    shape = SHAPE_WORDS[obj.shape][lang]
    answer = sentence(f"a {shape}", lang) if lang == "en" else sentence(shape, lang)
    return Turn("shape", question, answer, {"object": i, "colour": obj.colour, "shape": obj.shape})


def _position(scene: Scene, lang: str, rng: random.Random) -> Turn | None:
    cells = {i: grid_cell(scene.objects[i], scene.width, scene.height) for i in describable(scene)}
    candidates = [i for i, cell in cells.items() if cell is not None]
    if not candidates:
        return None
    i = rng.choice(candidates)
    obj, cell = scene.objects[i], cells[i]
    question = QUESTIONS["position"][lang].format(object=definite(obj.colour, obj.shape, lang))
    target = {"object": i, "colour": obj.colour, "shape": obj.shape, "position": cell}
    return Turn("position", question, POSITION_ANSWERS[lang][cell], target)  # type: ignore[index]


def _count(scene: Scene, lang: str, rng: random.Random) -> Turn:
    of = rng.choice(("all", "shape", "colour"))
    target: dict[str, Any] = {"of": of}
    if of == "all":
        question = QUESTIONS["count_all"][lang]
        count = len(scene.objects)
    elif of == "shape":
        shape = rng.choice([o.shape for o in scene.objects] if rng.random() < 0.8 else SHAPES)
        words = SHAPE_WORDS[shape]
        question = QUESTIONS["count_shape"][lang].format(plural=words["plural"], shape=words["zh"])
        count = sum(o.shape == shape for o in scene.objects)
        target["shape"] = shape
    else:
        colour = rng.choice([o.colour for o in scene.objects] if rng.random() < 0.8 else list(COLOURS))
        question = QUESTIONS["count_colour"][lang].format(colour=COLOUR_WORDS[colour][lang])
        count = sum(o.colour == colour for o in scene.objects)
        target["colour"] = colour
    target["count"] = count
    return Turn("count", question, sentence(str(count), lang), target)


def _absent_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A (colour, shape) pair not in the scene; half the time one sharing a colour or a shape with an object."""
    present = {(o.colour, o.shape) for o in scene.objects}
    near = rng.random() < 0.5
    while True:
        obj = rng.choice(scene.objects)
        colour = obj.colour if near and rng.random() < 0.5 else rng.choice(list(COLOURS))
        shape = obj.shape if near and colour != obj.colour else rng.choice(SHAPES)
        if (colour, shape) not in present:
            return colour, shape


def _yesno(scene: Scene, lang: str, rng: random.Random) -> Turn:
    present = rng.random() < 0.5
    if present:
        obj = rng.choice(scene.objects)
        colour, shape = obj.colour, obj.shape
    else:
        colour, shape = _absent_pair(scene, rng)
    question = QUESTIONS["yesno"][lang].format(
        object=(indefinite if lang == "en" else object_name)(colour, shape, lang)
    )
    target = {"colour": colour, "shape": shape, "answer": "yes" if present else "no"}
    return Turn("yesno", question, YES_NO[lang][present], target)


def _ground(scene: Scene, lang: str, rng: random.Random) -> Turn | None:
    candidates = describable(scene)
    if not candidates:
        return None
    i = rng.choice(candidates)
    obj = scene.objects[i]
    label = definite(obj.colour, obj.shape, lang)
    box = normalised_box(obj.box, scene.width, scene.height)
    target = {"object": i, "colour": obj.colour, "shape": obj.shape, "box": box}
    return Turn("ground", chat_grounding_prompt(label, lang), format_box(Box(*box), label), target)


def _identify(scene: Scene, lang: str, rng: random.Random) -> Turn:
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    box = normalised_box(obj.box, scene.width, scene.height)
    question = chat_region_prompt(Box(*box), QUESTIONS["identify"][lang])
    target = {"object": i, "colour": obj.colour, "shape": obj.shape, "box": box}
    return Turn("identify", question, sentence(indefinite(obj.colour, obj.shape, lang), lang), target)


def _find_all(scene: Scene, lang: str, rng: random.Random) -> Turn:
    found = []
    for i in reading_order(scene.objects):
        obj = scene.objects[i]
        found.append(
            {"colour": obj.colour, "shape": obj.shape, "box": normalised_box(obj.box, scene.width, scene.height)}
        )
    answer = "".join(format_box(Box(*o["box"]), object_name(o["colour"], o["shape"], lang)) for o in found)
    return Turn("find_all", QUESTIONS["find_all"][lang], answer, {"objects": found})


def _ocr(scene: Scene, lang: str, rng: random.Random) -> Turn | None:
    if not scene.words:
        return None
    words = [w.text for w in word_order(scene.words)]
    return Turn("ocr", QUESTIONS["ocr"][lang], " ".join(words), {"words": words})


BUILDERS: dict[str, Callable[[Scene, str, random.Random], Turn | None]] = {
    "caption": _caption,
    "colour": _colour,
    "shape": _shape,
    "position": _position,
    "count": _count,
    "yesno": _yesno,
    "ground": _ground,
    "identify": _identify,
    "find_all": _find_all,
    "ocr": _ocr,
}


def make_turn(kind: str, scene: Scene, lang: str, rng: random.Random) -> Turn | None:
    """A question of ``kind`` (one of ``SINGLE_IMAGE_KINDS``) about ``scene`` in ``lang``, or None
    when the scene does not allow it (no unique object to ask about, no words to read)."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; languages: {', '.join(LANGS)}")
    return BUILDERS[kind](scene, lang, rng)


def multiturn(scene: Scene, lang: str, rng: random.Random, turns: tuple[int, int] = (2, 3)) -> list[Turn] | None:
    """``turns[0]``-``turns[1]`` questions of different single-image kinds about one scene;
    None if fewer than wanted fit."""
    wanted = rng.randint(*turns)
    turns: list[Turn] = []
    for kind in rng.sample(SINGLE_IMAGE_KINDS, len(SINGLE_IMAGE_KINDS)):
        turn = make_turn(kind, scene, lang, rng)
        if turn is not None:
            turns.append(turn)
        if len(turns) == wanted:
            return turns
    return None


def difference_turn(change: dict[str, Any], lang: str) -> Turn:
    """The question about two pictures and the answer stating ``change`` (``scenes.change_scene``)."""
    name = object_name(change["colour"], change["shape"], lang)
    new_colour = COLOUR_WORDS[change["new_colour"]][lang] if "new_colour" in change else ""
    an_object = indefinite(change["colour"], change["shape"], lang)
    answer = DIFFERENCE_ANSWERS[lang][change["type"]].format(
        object=name, an_object=an_object[:1].upper() + an_object[1:], new_colour=new_colour
    )
    return Turn("difference", QUESTIONS["difference"][lang], answer, dict(change))
