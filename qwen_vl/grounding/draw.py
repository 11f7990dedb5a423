"""Drawing grounded objects on an image, and saving the result."""

from __future__ import annotations

import math
import os
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from qwen_vl.grounding.fonts import Font, load_label_fonts, split_runs
from qwen_vl.grounding.objects import Box, GroundedObject, ParseResult, Quad

#: Outline colours, given to labels in order of first appearance.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)

Colour = tuple[int, int, int]


def _as_objects(objects: ParseResult | Iterable[GroundedObject | Box | Quad]) -> list[GroundedObject]:
    items = objects.objects if isinstance(objects, ParseResult) else objects
    out: list[GroundedObject] = []
    for item in items:
        if isinstance(item, GroundedObject):
            out.append(item)
        elif isinstance(item, (Box, Quad)):
            out.append(GroundedObject(None, item, (0, 0)))
        else:
            raise TypeError(f"expected GroundedObject, Box or Quad, got {type(item).__name__}")
    return out


def _one_line(text: str) -> str:
    """``text`` on one line: control characters and whitespace runs become single spaces."""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in text)
    return " ".join(text.split())


def _latin1(text: str) -> str:
    """``text`` with what a bitmap font cannot encode replaced by ``?``."""
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_colour(background: Colour) -> Colour:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _clamp(value: int, high: int) -> int:
    return min(max(value, 0), high)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: Box | Quad, size: tuple[int, int], colour: Colour, width: int
) -> tuple[int, int]:
    """Outline ``shape``; returns the pixel point its label hangs from (left, top)."""
    w, h = size
    if isinstance(shape, Box):
        x1, y1, x2, y2 = shape.ordered().to_pixels(w, h).rounded("floor")
        x1, x2 = _clamp(x1, w - 1), _clamp(x2, w - 1)
        y1, y2 = _clamp(y1, h - 1), _clamp(y2, h - 1)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        return x1, y1
    points = [(_clamp(math.floor(x), w - 1), _clamp(math.floor(y), h - 1)) for x, y in shape.to_pixels(w, h)]
    draw.polygon(points, outline=colour, width=width)
    return min(p[0] for p in points), min(p[1] for p in points)


def _layout(draw: ImageDraw.ImageDraw, text: str, fonts: list[Font]) -> tuple[list[tuple[str, Font]], int, int, int]:
    """Runs of ``text`` with their fonts, and the width, ascent and descent of the line."""
    if not all(isinstance(f, ImageFont.FreeTypeFont) for f in fonts):
        fonts = fonts[:1]  # a bitmap font cannot be aligned on a baseline with others
    if not isinstance(fonts[0], ImageFont.FreeTypeFont):
        text = _latin1(text)
    runs = split_runs(text, fonts) if len(fonts) > 1 else [(text, fonts[0])]
    width = math.ceil(sum(draw.textlength(run, font=font) for run, font in runs))
    if isinstance(runs[0][1], ImageFont.FreeTypeFont):
        metrics = [font.getmetrics() for _, font in runs]  # type: ignore[union-attr]
        return runs, width, max(m[0] for m in metrics), max(m[1] for m in metrics)
    left, top, right, bottom = (math.floor(v) for v in draw.textbbox((0, 0), runs[0][0], font=runs[0][1]))
    return runs, right - left, bottom - top, 0


def _draw_label(
    draw: ImageDraw.ImageDraw,
    text: str,
    anchor: tuple[int, int],
    size: tuple[int, int],
    colour: Colour,
    fonts: list[Font],
) -> None:
    """``text`` on a ``colour`` background just above ``anchor`` (just below it when
    there is no room above), kept inside the image."""
    w, h = size
    runs, text_w, ascent, descent = _layout(draw, text, fonts)
    pad = 2
    box_w, box_h = text_w + 2 * pad, ascent + descent + 2 * pad
    x = _clamp(anchor[0], max(0, w - box_w))
    y = anchor[1] - box_h
    if y < 0:
        y = anchor[1]
    y = _clamp(y, max(0, h - box_h))
    draw.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=colour)
    ink = _text_colour(colour)
    if len(runs) == 1 and not isinstance(runs[0][1], ImageFont.FreeTypeFont):
        left, top, _, _ = draw.textbbox((0, 0), runs[0][0], font=runs[0][1])
        draw.text((x + pad - left, y + pad - top), runs[0][0], font=runs[0][1], fill=ink)
        return
    pen_x, baseline = float(x + pad), y + pad + ascent
    for run, font in runs:
        draw.text((pen_x, baseline), run, font=font, fill=ink, anchor="ls")
        pen_x += draw.textlength(run, font=font)


def draw_grounding(
    image: Image.Image,
    objects: ParseResult | Iterable[GroundedObject | Box | Quad],
    font: Font | None = None,
    font_path: str | os.PathLike[str] | None = None,
    line_width: int | None = None,
    *,
    font_size: int | None = None,
) -> Image.Image:
    """An RGB copy of ``image`` with ``objects`` outlined (boxes as rectangles, quads as
    polygons) and their labels written on a filled background above each shape.

    Each label gets its own colour; unlabelled shapes get one colour each. The input
    image is not modified. Labels use ``font`` alone when given; otherwise the font at
    ``font_path``, else a CJK font found by ``find_cjk_font``, with Pillow's default font
    for characters it lacks. Without a CJK font, Pillow's default font is used and a
    warning says that CJK labels may not render (only when a label is not ASCII).
    ``font_size`` sets the size of loaded fonts (default from the image size). Pixel corners are
    ``floor(v * size / 1000)``, as in the official drawing, clamped into the image.
    """
    canvas = image.convert("RGB")
    if canvas is image:
        canvas = image.copy()
    items = _as_objects(objects)
    if not items:
        return canvas
    w, h = canvas.size
    width = line_width if line_width is not None else max(2, round(math.sqrt(w * h) / 250))
    labels = [o.label for o in items if o.label]
    fonts: list[Font] = []
    if labels and font is not None:
        fonts = [font]
    elif labels:
        size = font_size if font_size is not None else max(12, round(math.sqrt(w * h) / 32))
        fonts = load_label_fonts(size, font_path, need_cjk=any(not label.isascii() for label in labels))
    draw = ImageDraw.Draw(canvas)
    colours: dict[object, Colour] = {}
    pending_labels: list[tuple[str, tuple[int, int], Colour]] = []
    for index, item in enumerate(items):
        key = item.label if item.label else ("unlabelled", index)
        colour = colours.setdefault(key, PALETTE[len(colours) % len(PALETTE)])
        anchor = _draw_shape(draw, item.box, (w, h), colour, width)
        text = _one_line(item.label) if item.label else ""
        if text:
            pending_labels.append((text, anchor, colour))
    for text, anchor, colour in pending_labels:  # labels last, so no outline crosses them
        _draw_label(draw, text, anchor, (w, h), colour, fonts)
    return canvas


def save_annotated(image: Image.Image, path: str | os.PathLike[str], format: str | None = None) -> Path:
    """Write ``image`` to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``). The format comes from ``format`` or the file extension."""
    target = Path(path)
    if format is None:
        format = Image.registered_extensions().get(target.suffix.lower())
        if format is None:
            raise ValueError(f"cannot tell the image format of {str(target)!r}; pass format=")
    try:
        mode = target.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=format)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target
