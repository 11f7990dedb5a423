"""Typed grounding objects: boxes and quadrilaterals in Qwen-VL's 0-1000 space."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

#: Coordinates of ``<box>`` and ``<quad>`` are integers in ``0..SCALE`` (both axes).
SCALE = 1000

Point = tuple[int, int]


def _check_coordinate(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= SCALE:
        raise ValueError(f"{name} must be in 0..{SCALE}, got {value}")


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _to_normalised(value: float, size: float) -> int:
    if not math.isfinite(value):
        raise ValueError(f"pixel coordinate must be finite, got {value}")
    return min(SCALE, max(0, _round_half_up(value * SCALE / size)))


@dataclass(frozen=True)
class PixelBox:
    """A box in pixel coordinates (floats; ``x`` grows right, ``y`` down)."""

    x1: float
    y1: float
    x2: float
    y2: float

    def rounded(self, how: Literal["nearest", "floor"] = "nearest") -> tuple[int, int, int, int]:
        """Integer corners: nearest pixel (halves up) or ``"floor"`` (what the official drawing does)."""
        op = math.floor if how == "floor" else _round_half_up
        return op(self.x1), op(self.y1), op(self.x2), op(self.y2)

    def to_normalised(self, width: float, height: float) -> Box:
        """The 0-1000 box of this pixel box on a ``width`` x ``height`` image
        (rounded to integers, clamped to 0..1000, corners ordered)."""
        _check_size(width, height)
        xa, xb = _to_normalised(self.x1, width), _to_normalised(self.x2, width)
        ya, yb = _to_normalised(self.y1, height), _to_normalised(self.y2, height)
        return Box(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``<box>(x1,y1),(x2,y2)</box>``, integers in 0..1000.

    The corners are kept as written; ``ordered()`` swaps them so that x1 <= x2, y1 <= y2.
    """

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self) -> None:
        for name in ("x1", "y1", "x2", "y2"):
            _check_coordinate(getattr(self, name), name)

    def ordered(self) -> Box:
        """The same box with x1 <= x2 and y1 <= y2."""
        return Box(min(self.x1, self.x2), min(self.y1, self.y2), max(self.x1, self.x2), max(self.y1, self.y2))

    def to_pixels(self, width: float, height: float) -> PixelBox:
        """Pixel coordinates on a ``width`` x ``height`` image: ``x * width / 1000``, ``y * height / 1000``."""
        _check_size(width, height)
        return PixelBox(
            self.x1 * width / SCALE, self.y1 * height / SCALE, self.x2 * width / SCALE, self.y2 * height / SCALE
        )

    def to_pixel_ints(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``to_pixels`` rounded to the nearest pixel (halves up)."""
        return self.to_pixels(width, height).rounded()


@dataclass(frozen=True)
class Quad:
    """A quadrilateral ``<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>`` (4 points in 0..1000)."""

    points: tuple[Point, Point, Point, Point]

    def __post_init__(self) -> None:
        points = tuple(tuple(p) for p in self.points)
        if len(points) != 4 or any(len(p) != 2 for p in points):
            raise ValueError(f"a quad has 4 (x, y) points, got {self.points!r}")
        for i, (x, y) in enumerate(points):
            _check_coordinate(x, f"x{i + 1}")
            _check_coordinate(y, f"y{i + 1}")
        object.__setattr__(self, "points", points)

    def bounds(self) -> Box:
        """The smallest box holding the four points."""
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        return Box(min(xs), min(ys), max(xs), max(ys))

    def to_pixels(self, width: float, height: float) -> list[tuple[float, float]]:
        """The four points in pixel coordinates."""
        _check_size(width, height)
        return [(x * width / SCALE, y * height / SCALE) for x, y in self.points]


@dataclass(frozen=True)
class GroundedObject:
    """One box or quad found in a text, with the ``<ref>`` label that names it (if any).

    ``span`` is the ``(start, end)`` character range of the object's tags in the text;
    for the first box after a ``<ref>`` it starts at the ``<ref>``.
    """

    label: str | None
    box: Box | Quad
    span: tuple[int, int]


@dataclass(frozen=True)
class ParseResult:
    """Objects found by ``parse_grounding`` and a description of every fragment it skipped."""

    objects: list[GroundedObject]
    problems: list[str]

    @property
    def boxes(self) -> list[Box | Quad]:
        """The shapes of ``objects``, in order."""
        return [o.box for o in self.objects]
