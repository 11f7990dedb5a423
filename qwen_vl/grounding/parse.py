"""Reading and writing Qwen-VL's grounding tags: ``<ref>``, ``<box>``, ``<quad>``.

``parse_grounding`` never raises: every malformed fragment is skipped and described
in ``ParseResult.problems``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwen_vl.grounding.objects import SCALE, Box, GroundedObject, ParseResult, Quad

_TAG = re.compile(r"<(/?)(ref|box|quad)>")
_SHAPE_SPAN = re.compile(r"<(box|quad)>[^<]*</\1>")
_POINT_LIST = re.compile(r"\s*\([^()]*\)(?:\s*,\s*\([^()]*\))*\s*")
_POINT = re.compile(r"\(([^()]*)\)")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_POINTS_OF = {"box": 2, "quad": 4}
_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")


@dataclass(frozen=True)
class _Element:
    name: str  # "ref", "box" or "quad"
    content: str
    start: int
    end: int


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _elements(text: str, problems: list[tuple[int, str]]) -> list[_Element]:
    """Closed ``<tag>content</tag>`` pairs in order; unpaired tags become problems."""
    tags = list(_TAG.finditer(text))
    out: list[_Element] = []
    i = 0
    while i < len(tags):
        tag = tags[i]
        name = tag.group(2)
        if tag.group(1):
            problems.append((tag.start(), f"stray </{name}> at {tag.start()}"))
            i += 1
            continue
        nxt = tags[i + 1] if i + 1 < len(tags) else None
        if nxt is None or not nxt.group(1) or nxt.group(2) != name:
            problems.append((tag.start(), f"unclosed <{name}> at {tag.start()}"))
            i += 1
            continue
        out.append(_Element(name, text[tag.end() : nxt.start()], tag.start(), nxt.end()))
        i += 2
    return out


def _coordinate(text: str) -> int | str:
    """The integer in ``text`` or the reason it is not a valid coordinate."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        return f"non-integer coordinate {_short(text)}"
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > 4 or text.startswith("-") and digits != "0":
        return f"coordinate {_short(text)} out of range 0..{SCALE}"
    value = int(digits)
    if value > SCALE:
        return f"coordinate {value} out of range 0..{SCALE}"
    return value


def _shape(element: _Element) -> Box | Quad | str:
    """The shape written in a ``<box>``/``<quad>`` element or the reason it is malformed."""
    content = element.content
    if not _POINT_LIST.fullmatch(content):
        return f"malformed coordinates {_short(content)}"
    points: list[tuple[int, int]] = []
    for group in _POINT.findall(content):
        parts = group.split(",")
        if len(parts) != 2:
            return f"point {_short('(' + group + ')')} does not have 2 coordinates"
        values = [_coordinate(p) for p in parts]
        for value in values:
            if isinstance(value, str):
                return value
        points.append((values[0], values[1]))  # type: ignore[arg-type]
    expected = _POINTS_OF[element.name]
    if len(points) != expected:
        return f"expected {expected} points, got {len(points)}"
    if element.name == "box":
        (x1, y1), (x2, y2) = points
        return Box(x1, y1, x2, y2)
    return Quad(tuple(points))  # type: ignore[arg-type]


def _report_no_box(ref: _Element, problems: list[tuple[int, str]]) -> None:
    label = ref.content.strip()
    if label:  # an empty ref is reported once, as empty
        problems.append((ref.start, f"<ref> at {ref.start} ({_short(label)}) has no box"))


def parse_grounding(text: str) -> ParseResult:
    """Find every ``<ref>label</ref><box>(x1,y1),(x2,y2)</box>`` (and ``<quad>``) in ``text``.

    A ``<ref>`` names the boxes and quads that follow it directly (only whitespace
    between); a box or quad may also stand alone (label ``None``). Labels are stripped
    of surrounding whitespace. Coordinates are integers in 0..1000, spaces around them
    are allowed. Problems are listed in text order. Never raises: unclosed or stray tags, malformed or out-of-range
    coordinates, empty refs and refs without a box are reported in ``problems``.
    """
    if not isinstance(text, str):
        return ParseResult([], [f"expected str, got {type(text).__name__}"])
    problems: list[tuple[int, str]] = []
    objects: list[GroundedObject] = []
    pending: _Element | None = None  # a <ref> not yet given a shape
    group: tuple[str | None] | None = None  # label of the run of shapes being read
    prev_end = -1
    for element in _elements(text, problems):
        adjacent = prev_end >= 0 and not text[prev_end : element.start].strip()
        prev_end = element.end
        if element.name == "ref":
            if pending is not None:
                _report_no_box(pending, problems)
            label = element.content.strip()
            if not label:
                problems.append((element.start, f"empty <ref> at {element.start}"))
            pending, group = element, None
            continue
        start = element.start
        if pending is not None and adjacent:
            group, start = (pending.content.strip() or None,), pending.start
            pending = None
        elif group is None or not adjacent:
            if pending is not None:
                _report_no_box(pending, problems)
                pending = None
            group = (None,)
        shape = _shape(element)
        if isinstance(shape, str):
            problems.append((element.start, f"<{element.name}> at {element.start}: {shape}"))
            continue
        objects.append(GroundedObject(group[0], shape, (start, element.end)))
    if pending is not None:
        _report_no_box(pending, problems)
    problems.sort(key=lambda p: p[0])
    return ParseResult(objects, [message for _, message in problems])


def strip_grounding(text: str) -> str:
    """``text`` for display: boxes and quads removed, ``<ref>`` tags removed, labels kept."""
    return _TAG.sub("", _SHAPE_SPAN.sub("", text))


def format_box(box: Box | Quad | tuple[int, int, int, int], label: str | None = None) -> str:
    """The official string ``<ref>label</ref><box>(x1,y1),(x2,y2)</box>`` (``<quad>`` for a Quad).

    ``parse_grounding(format_box(b, label)).objects[0]`` gives back ``b`` and ``label``
    (labels are stripped when read back).
    """
    if not isinstance(box, (Box, Quad)):
        box = Box(*box)
    if isinstance(box, Box):
        shape = f"<box>({box.x1},{box.y1}),({box.x2},{box.y2})</box>"
    else:
        shape = "<quad>" + ",".join(f"({x},{y})" for x, y in box.points) + "</quad>"
    if label is None:
        return shape
    if not label.strip():
        raise ValueError("label must not be empty")
    if any(tag in label for tag in _TAGS):
        raise ValueError(f"label must not contain grounding tags: {label!r}")
    return f"<ref>{label}</ref>{shape}"
