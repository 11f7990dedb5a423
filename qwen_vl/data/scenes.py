"""Scenes of the synthetic "shapes world": sampling, rendering and the one-change edit.

A scene is a light background with 1-6 flat shapes that never overlap (a margin keeps
them apart) and sometimes one or two dark upper-case words. Everything is drawn without
anti-aliasing except the text, so every shape pixel has exactly its colour's RGB value.
Pixel boxes are integers ``(x1, y1, x2, y2)`` tight around the drawn pixels, ``x2`` and
``y2`` exclusive (as ``PIL.Image.getbbox``); ``box_1000`` is the same box in Qwen-VL's
0-1000 space (``PixelBox.to_normalised``).

Sampling takes a ``random.Random``; rendering is a pure function of the scene (the noise
of a noisy background comes from the seed stored in the scene), so a scene read back
from its JSON-ready dict draws the same picture.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..grounding.objects import PixelBox

RGB = tuple[int, int, int]
IntBox = tuple[int, int, int, int]

#: Shape colours: saturated or dark, far from every background colour and from each other.
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 25),
    "green": (40, 160, 60),
    "blue": (35, 80, 215),
    "purple": (130, 50, 170),
    "pink": (245, 120, 185),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "rectangle", "triangle", "star", "hexagon", "diamond")
#: Size class -> range of the shape's longer side, as a fraction of the image's shorter side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.11, 0.15), "medium": (0.18, 0.24), "large": (0.28, 0.35)}
#: Light, nearly grey background colours (every channel >= 205 even with noise).
BACKGROUND_COLOURS: tuple[RGB, ...] = (
    (232, 232, 232),
    (224, 230, 238),
    (238, 232, 220),
    (226, 236, 226),
    (240, 234, 240),
    (245, 245, 238),
)
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient_h", "gradient_v", "noise")
#: Dark colours of the words.
TEXT_COLOURS: tuple[RGB, ...] = ((10, 10, 10), (30, 30, 90), (80, 20, 20))
NOISE_AMPLITUDE = 10
NOISE_BLOCK = 4

MIN_SIDE, MAX_SIDE = 224, 640
#: Pictures are at most 1.25 times as long as wide: the model sees them squashed into a
#: square, so a square in a long picture would look like a rectangle (RECTANGLE_ASPECT).
MAX_ASPECT = 1.25
#: Long side over short side of a rectangle: still at least 1.6 after the squashing.
RECTANGLE_ASPECT = (2.0, 2.4)
MAX_OBJECTS = 6
WORD_PROBABILITY = 0.3
RANDOM_LETTERS_PROBABILITY = 0.2
#: Word cap height range, as a fraction of the image's shorter side.
CAP_HEIGHT = (0.06, 0.1)
_CAP_PER_SIZE = 0.71  # cap height of Pillow's default font / its size
_PLACEMENT_TRIES = 40

#: Common English words of 3-6 letters written in the pictures.
WORDS: tuple[str, ...] = tuple(
    """ACT AGE AIR ALL ANT ARM ART ASK BAG BALL BAND BANK BASE BEAR BED BELL BIKE BIRD BLUE BOAT
    BODY BOOK BOX BOY BREAD BUS CAKE CALL CAMP CAP CAR CARD CAT CHAIR CITY CLOCK CLOUD COAT COLD
    COW CUP DAY DEER DESK DOG DOOR DRUM DUCK EAR EARTH EGG EYE FACE FARM FISH FLAG FOOD FOOT FORK
    FOX FROG GAME GIFT GIRL GOAT GOLD GRASS HAND HAT HEAD HILL HOME HORSE HOUSE ICE JAM JAR JUICE
    KEY KID KING KITE LAKE LAMP LEAF LEG LION LOCK MAP MILK MOON MOUSE NAME NEST NET NIGHT NOSE
    NOTE OCEAN OWL PAGE PAN PARK PEN PIG PLANE PLANT PLATE POOL QUEEN RAIN RING RIVER ROAD ROCK
    ROOF ROOM ROSE SALT SAND SEA SEED SHEEP SHIP SHOE SHOP SKY SMILE SNOW SOCK SONG SOUP SPOON
    STAR STONE STORE SUN TABLE TAIL TEA TENT TIME TOWN TOY TRAIN TREE TRUCK TURN WALL WATCH WATER
    WAVE WHALE WIND WING WOLF WOOD WORD WORLD YARD ZOO APPLE BEACH BENCH BERRY BRICK BRUSH CANDY
    CHALK CLOWN CORN CROWN DREAM FENCE FIELD FLOOR FRUIT GLASS GRAPE HEART HONEY JUMP LEMON LIGHT
    MONEY MUSIC OPEN PAINT PAPER PEACH PEAR PIANO PIZZA RADIO ROBOT SHELF SNAKE STAIR SUGAR TIGER
    TOAST TOWER VOICE WHEEL""".split()
)


@dataclass(frozen=True)
class Background:
    """``kind`` is one of ``BACKGROUND_KINDS``; gradients run from ``colours[0]`` to ``colours[1]``;
    ``seed`` draws the noise of ``"noise"``."""

    kind: str
    colours: tuple[RGB, ...]
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "colours": [list(c) for c in self.colours], "seed": self.seed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Background:
        return cls(data["kind"], tuple(tuple(c) for c in data["colours"]), int(data.get("seed", 0)))


@dataclass(frozen=True)
class SceneObject:
    """One shape: drawn in the frame ``(left, top, width, height)``; ``box`` is tight around its pixels."""

    shape: str
    colour: str
    size: str
    frame: IntBox
    box: IntBox

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def to_json(self, width: int, height: int) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "box": list(self.box),
            "box_1000": normalised_box(self.box, width, height),
            "frame": list(self.frame),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SceneObject:
        return cls(data["shape"], data["colour"], data["size"], tuple(data["frame"]), tuple(data["box"]))


@dataclass(frozen=True)
class Word:
    """A word drawn at ``origin`` with Pillow's default font at ``font_size``; ``box`` is tight around its pixels."""

    text: str
    font_size: int
    colour: RGB
    origin: tuple[int, int]
    box: IntBox

    def to_json(self, width: int, height: int) -> dict[str, Any]:
        return {
            "text": self.text,
            "box": list(self.box),
            "box_1000": normalised_box(self.box, width, height),
            "font_size": self.font_size,
            "colour": list(self.colour),
            "origin": list(self.origin),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Word:
        return cls(data["text"], data["font_size"], tuple(data["colour"]), tuple(data["origin"]), tuple(data["box"]))


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: tuple[SceneObject, ...]
    words: tuple[Word, ...] = field(default_factory=tuple)

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)

    def to_json(self) -> dict[str, Any]:
        w, h = self.width, self.height
        return {
            "width": w,
            "height": h,
            "background": self.background.to_json(),
            "objects": [o.to_json(w, h) for o in self.objects],
            "words": [t.to_json(w, h) for t in self.words],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        return cls(
            data["width"],
            data["height"],
            Background.from_json(data["background"]),
            tuple(SceneObject.from_json(o) for o in data["objects"]),
            tuple(Word.from_json(t) for t in data.get("words", [])),
        )


def normalised_box(box: IntBox, width: int, height: int) -> list[int]:
    """A pixel box as ``[x1, y1, x2, y2]`` in the 0-1000 space."""
    b = PixelBox(*box).to_normalised(width, height)
    return [b.x1, b.y1, b.x2, b.y2]


# ----- masks -----------------------------------------------------------------------------
def _star_points(w: int, h: int) -> list[tuple[float, float]]:
    cx, cy, outer = (w - 1) / 2, (h - 1) / 2 + 0.06 * h, (w - 1) / 2
    inner = 0.45 * outer
    points = []
    for k in range(10):
        angle = -math.pi / 2 + k * math.pi / 5
        r = outer if k % 2 == 0 else inner
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _outline(shape: str, w: int, h: int) -> list[tuple[float, float]]:
    """Polygon of ``shape`` in a ``w`` x ``h`` frame (circle and boxes are drawn directly)."""
    if shape == "triangle":
        return [((w - 1) / 2, 0), (w - 1, h - 1), (0, h - 1)]
    if shape == "diamond":
        return [((w - 1) / 2, 0), (w - 1, (h - 1) / 2), ((w - 1) / 2, h - 1), (0, (h - 1) / 2)]
    if shape == "hexagon":
        q = (w - 1) / 4
        return [(q, 0), (3 * q, 0), (w - 1, (h - 1) / 2), (3 * q, h - 1), (q, h - 1), (0, (h - 1) / 2)]
    if shape == "star":
        return _star_points(w, h)
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=4096)
def shape_mask(shape: str, w: int, h: int) -> tuple[Image.Image, IntBox]:
    """An ``L`` mask (255 inside) of ``shape`` drawn in a ``w`` x ``h`` frame, and its tight box
    in frame coordinates. Cached: do not modify the returned image."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
    elif shape in ("square", "rectangle"):
        draw.rectangle((0, 0, w - 1, h - 1), fill=255)
    else:
        draw.polygon(_outline(shape, w, h), fill=255)
    box = mask.getbbox()
    if box is None:
        raise ValueError(f"{shape} in a {w}x{h} frame draws nothing")
    return mask, box


def frame_size(shape: str, long_side: int, rng: random.Random) -> tuple[int, int]:
    """Width and height of the drawing frame of ``shape`` whose longer side is ``long_side``."""
    if shape == "rectangle":  # 1.3 times longer, so that a small one is not a thin line
        long_side = round(1.3 * long_side)
        short = round(long_side / rng.uniform(*RECTANGLE_ASPECT))
        return (long_side, short) if rng.random() < 0.5 else (short, long_side)
    if shape in ("triangle", "hexagon"):
        return long_side, round(long_side * 0.87)
    if shape == "diamond":
        return round(long_side * 0.7), long_side
    return long_side, long_side


@lru_cache(maxsize=64)
def font_for(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font at ``size`` (the same on every machine)."""
    return ImageFont.load_default(size=size)  # Pillow's built-in scalable font: the same everywhere


@lru_cache(maxsize=4096)
def text_mask(text: str, font_size: int) -> tuple[Image.Image, IntBox]:
    """An ``L`` mask of ``text`` drawn at (0, 0) and its tight box. Cached: do not modify."""
    font = font_for(font_size)
    _, _, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right + 2, bottom + 2), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
    box = mask.getbbox()
    if box is None:
        raise ValueError(f"{text!r} draws nothing")
    return mask, box


# ----- placement -------------------------------------------------------------------------
def margin_of(width: int, height: int) -> int:
    """Free pixels kept between any two things and between a thing and the image's edge."""
    return max(4, round(0.03 * min(width, height)))


def _grow(box: IntBox, m: int) -> IntBox:
    return box[0] - m, box[1] - m, box[2] + m, box[3] + m


def _intersects(a: IntBox, b: IntBox) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _free(box: IntBox, taken: list[IntBox], m: int) -> bool:
    grown = _grow(box, m)
    return not any(_intersects(grown, t) for t in taken)


def _place(
    inner: IntBox, w: int, h: int, width: int, height: int, taken: list[IntBox], rng: random.Random
) -> tuple[int, int] | None:
    """Top-left corner of a ``w`` x ``h`` frame whose tight ``inner`` box is inside the image
    (with the margin) and free of ``taken``; None after ``_PLACEMENT_TRIES`` misses."""
    m = margin_of(width, height)
    lo_x, hi_x = m - inner[0], width - m - inner[2]
    lo_y, hi_y = m - inner[1], height - m - inner[3]
    if hi_x < lo_x or hi_y < lo_y:
        return None
    for _ in range(_PLACEMENT_TRIES):
        left, top = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
        box = (left + inner[0], top + inner[1], left + inner[2], top + inner[3])
        if _free(box, taken, m):
            return left, top
    return None


def place_object(
    shape: str, colour: str, size: str, width: int, height: int, taken: list[IntBox], rng: random.Random
) -> SceneObject | None:
    """A new object of this kind at a free random position (smaller sizes tried when it does not fit)."""
    names = list(SIZES)
    for name in names[: names.index(size) + 1][::-1]:
        lo, hi = SIZES[name]
        short = min(width, height)
        long_side = rng.randint(round(lo * short), round(hi * short))
        w, h = frame_size(shape, long_side, rng)
        _, inner = shape_mask(shape, w, h)
        corner = _place(inner, w, h, width, height, taken, rng)
        if corner is not None:
            left, top = corner
            box = (left + inner[0], top + inner[1], left + inner[2], top + inner[3])
            return SceneObject(shape, colour, name, (left, top, w, h), box)
    return None


def move_object(
    obj: SceneObject, width: int, height: int, taken: list[IntBox], rng: random.Random
) -> SceneObject | None:
    """``obj`` at a new free position that does not touch its old box; None when none is found."""
    left, top, w, h = obj.frame
    inner = (obj.box[0] - left, obj.box[1] - top, obj.box[2] - left, obj.box[3] - top)
    corner = _place(inner, w, h, width, height, [*taken, obj.box], rng)
    if corner is None:
        return None
    nl, nt = corner
    box = (nl + inner[0], nt + inner[1], nl + inner[2], nt + inner[3])
    return replace(obj, frame=(nl, nt, w, h), box=box)


def _word_text(rng: random.Random) -> str:
    if rng.random() < RANDOM_LETTERS_PROBABILITY:
        return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 6)))
    return rng.choice(WORDS)


def place_word(width: int, height: int, taken: list[IntBox], rng: random.Random) -> Word | None:
    """A random word at a free random position; None when it does not fit."""
    text = _word_text(rng)
    cap = rng.uniform(*CAP_HEIGHT) * min(width, height)
    font_size = max(8, round(cap / _CAP_PER_SIZE))
    mask, inner = text_mask(text, font_size)
    corner = _place(inner, mask.width, mask.height, width, height, taken, rng)
    if corner is None:
        return None
    left, top = corner
    box = (left + inner[0], top + inner[1], left + inner[2], top + inner[3])
    return Word(text, font_size, rng.choice(TEXT_COLOURS), (left, top), box)


# ----- sampling --------------------------------------------------------------------------
def sample_size(rng: random.Random) -> tuple[int, int]:
    """Width and height in ``[MIN_SIDE, MAX_SIDE]`` with an aspect ratio of at most ``MAX_ASPECT``."""
    width = rng.randint(MIN_SIDE, MAX_SIDE)
    lo, hi = max(MIN_SIDE, math.ceil(width / MAX_ASPECT)), min(MAX_SIDE, int(width * MAX_ASPECT))
    return width, rng.randint(lo, hi)


def sample_background(rng: random.Random) -> Background:
    kind = rng.choice(BACKGROUND_KINDS)
    first = rng.choice(BACKGROUND_COLOURS)
    if kind.startswith("gradient"):
        second = rng.choice([c for c in BACKGROUND_COLOURS if c != first])
        return Background(kind, (first, second))
    return Background(kind, (first,), rng.getrandbits(32) if kind == "noise" else 0)


def sample_scene(rng: random.Random, words: bool | None = None) -> Scene:
    """A random scene: 1-6 objects, and words with probability ``WORD_PROBABILITY``
    (``words=True``: at least one, ``False``: none)."""
    while True:
        width, height = sample_size(rng)
        background = sample_background(rng)
        taken: list[IntBox] = []
        objects: list[SceneObject] = []
        for _ in range(rng.randint(1, MAX_OBJECTS)):
            size = rng.choice(list(SIZES))
            obj = place_object(rng.choice(SHAPES), rng.choice(list(COLOURS)), size, width, height, taken, rng)
            if obj is not None:
                objects.append(obj)
                taken.append(obj.box)
        placed: list[Word] = []
        if words or (words is None and rng.random() < WORD_PROBABILITY):
            for _ in range(1 if rng.random() < 0.65 else 2):
                word = place_word(width, height, taken, rng)
                if word is not None:
                    placed.append(word)
                    taken.append(word.box)
        if objects and (placed or not words):
            return Scene(width, height, background, tuple(objects), tuple(placed))


# ----- the one-change edit ---------------------------------------------------------------
CHANGES: tuple[str, ...] = ("colour", "removed", "added", "moved")


def describable(scene: Scene) -> list[int]:
    """Indices of the objects whose (colour, shape) pair is unique in the scene."""
    pairs = [(o.colour, o.shape) for o in scene.objects]
    return [i for i, p in enumerate(pairs) if pairs.count(p) == 1]


def _taken(scene: Scene, skip: int | None = None) -> list[IntBox]:
    return [o.box for i, o in enumerate(scene.objects) if i != skip] + [t.box for t in scene.words]


def change_scene(scene: Scene, rng: random.Random) -> tuple[Scene, dict[str, Any]] | None:
    """The scene with exactly one change and the change as a dict: ``type`` (one of ``CHANGES``),
    the object's ``colour`` and ``shape`` (before the change), ``object`` (its index in the
    first scene; in the second for ``"added"``), ``new_colour`` for ``"colour"`` and the
    pixel boxes ``box_before`` / ``box_after`` for ``"moved"``. None when no change fits."""
    unique = describable(scene)
    for kind in rng.sample(CHANGES, len(CHANGES)):
        if kind == "added":
            if len(scene.objects) >= MAX_OBJECTS:
                continue
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            obj = place_object(shape, colour, rng.choice(list(SIZES)), scene.width, scene.height, _taken(scene), rng)
            if obj is None:
                continue
            change = {"type": kind, "colour": colour, "shape": shape, "object": len(scene.objects)}
            return replace(scene, objects=(*scene.objects, obj)), change
        candidates = unique if kind != "removed" or len(scene.objects) > 1 else []
        if not candidates:
            continue
        index = rng.choice(candidates)
        old = scene.objects[index]
        change = {"type": kind, "colour": old.colour, "shape": old.shape, "object": index}
        objects = list(scene.objects)
        if kind == "colour":
            new_colour = rng.choice([c for c in COLOURS if c != old.colour])
            objects[index] = replace(old, colour=new_colour)
            change["new_colour"] = new_colour
        elif kind == "removed":
            del objects[index]
        else:
            moved = move_object(old, scene.width, scene.height, _taken(scene, index), rng)
            if moved is None:
                continue
            objects[index] = moved
            change["box_before"], change["box_after"] = list(old.box), list(moved.box)
        return replace(scene, objects=tuple(objects)), change
    return None


# ----- rendering -------------------------------------------------------------------------
def render_background(background: Background, width: int, height: int) -> Image.Image:
    """The background as an RGB image (small arrays scaled up with nearest-neighbour: fast and exact)."""
    first = np.array(background.colours[0], dtype=np.float64)  # (3,)
    if background.kind == "plain":
        return Image.new("RGB", (width, height), background.colours[0])
    if background.kind in ("gradient_h", "gradient_v"):
        second = np.array(background.colours[1], dtype=np.float64)  # (3,)
        horizontal = background.kind == "gradient_h"
        t = np.linspace(0.0, 1.0, width if horizontal else height)[:, None]  # (L, 1)
        line = np.rint(first + (second - first) * t).astype(np.uint8)  # (L, 3)
        strip = line[None, :, :] if horizontal else line[:, None, :]  # (1, W, 3) or (H, 1, 3)
        return Image.fromarray(np.ascontiguousarray(strip), "RGB").resize((width, height), Image.Resampling.NEAREST)
    if background.kind != "noise":
        raise ValueError(f"unknown background kind {background.kind!r}")
    rng = np.random.default_rng(background.seed)
    bh, bw = -(-height // NOISE_BLOCK), -(-width // NOISE_BLOCK)
    noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(bh, bw, 1))  # (bh, bw, 1)
    blocks = np.clip(first + noise, 0, 255).astype(np.uint8)  # (bh, bw, 3)
    image = Image.fromarray(blocks, "RGB").resize((bw * NOISE_BLOCK, bh * NOISE_BLOCK), Image.Resampling.NEAREST)
    return image.crop((0, 0, width, height))


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image."""
    image = render_background(scene.background, scene.width, scene.height)
    for obj in scene.objects:
        left, top, w, h = obj.frame
        mask, _ = shape_mask(obj.shape, w, h)
        image.paste(COLOURS[obj.colour], (left, top, left + w, top + h), mask)
    for word in scene.words:
        mask, _ = text_mask(word.text, word.font_size)
        left, top = word.origin
        image.paste(word.colour, (left, top, left + mask.width, top + mask.height), mask)
    return image
