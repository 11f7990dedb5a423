"""Grounding tags: parsing, formatting, coordinates, prompts, drawing, fonts."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFont

from qwen_vl import grounding
from qwen_vl.grounding import (
    FONT_ENV,
    PALETTE,
    Box,
    GroundedObject,
    PixelBox,
    Quad,
    chat_grounding_prompt,
    chat_region_prompt,
    draw_bbox_on_latest_picture,
    draw_grounding,
    find_cjk_font,
    format_box,
    grounded_caption_prompt,
    has_cjk_glyphs,
    has_glyph,
    latest_picture,
    parse_grounding,
    ref_prompt,
    region_prompt,
    save_annotated,
    split_runs,
    strip_grounding,
)
from qwen_vl.grounding import fonts as fonts_module
from qwen_vl.images import ImageLoadError, ImagePolicy

CJK_FONT = find_cjk_font()
needs_cjk_font = pytest.mark.skipif(
    CJK_FONT is None,
    reason=f"no font with CJK glyphs on this machine (install fonts-droid-fallback or fonts-wqy-zenhei, or set {FONT_ENV})",
)

B = Box
Q = Quad
END = -1  # stands for len(text) in the table below

# (text, [(label, shape, (start, end))], problems)
PARSE_CASES = [
    ("<ref>dog</ref><box>(10,20),(30,40)</box>", [("dog", B(10, 20, 30, 40), (0, 40))], []),
    (
        "<ref>cats</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>",
        [("cats", B(1, 2, 3, 4), (0, 37)), ("cats", B(5, 6, 7, 8), (37, 59))],
        [],
    ),
    (
        "<ref>cats</ref><box>(1,2),(3,4)</box>\n <box>(5,6),(7,8)</box>",
        [("cats", B(1, 2, 3, 4), (0, 37)), ("cats", B(5, 6, 7, 8), (39, 61))],
        [],
    ),
    ("<ref>dog</ref> runs", [], ["<ref> at 0 ('dog') has no box"]),
    ("see <box>(1,2),(3,4)</box>", [(None, B(1, 2, 3, 4), (4, 26))], []),
    ("<quad>(1,2),(3,4),(5,6),(7,8)</quad>", [(None, Q(((1, 2), (3, 4), (5, 6), (7, 8))), (0, 36))], []),
    (
        "<ref>文字</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>",
        [("文字", Q(((1, 2), (3, 4), (5, 6), (7, 8))), (0, 49))],
        [],
    ),
    ("框出<ref>小狗</ref><box>(0,0),(1000,1000)</box>。", [("小狗", B(0, 0, 1000, 1000), (2, 43))], []),
    ("<ref> the dog </ref> <box>( 12, 34 ),(56 ,78)</box>", [("the dog", B(12, 34, 56, 78), (0, END))], []),
    ("<box> (1,2) , (3,4) </box>", [(None, B(1, 2, 3, 4), (0, END))], []),
    ("<box>(+1,02),(-0,4)</box>", [(None, B(1, 2, 0, 4), (0, END))], []),
    ("<box>(900,800),(100,200)</box>", [(None, B(900, 800, 100, 200), (0, END))], []),
    (
        "<ref>dog</ref> is at <box>(1,2),(3,4)</box>",
        [(None, B(1, 2, 3, 4), (21, 43))],
        ["<ref> at 0 ('dog') has no box"],
    ),
    (
        "<ref>a</ref><box>(1,2),(3,4)</box> and <box>(5,6),(7,8)</box>",
        [("a", B(1, 2, 3, 4), (0, 34)), (None, B(5, 6, 7, 8), (39, 61))],
        [],
    ),
    (
        "<ref>a</ref><box>(1,2),(3,4)</box><ref>b</ref><box>(5,6),(7,8)</box>",
        [("a", B(1, 2, 3, 4), (0, 34)), ("b", B(5, 6, 7, 8), (34, 68))],
        [],
    ),
    ("<ref>a</ref><box>(1,2),(3,4)", [], ["<ref> at 0 ('a') has no box", "unclosed <box> at 12"]),
    (
        "</box><box>(1,2),(3,4)</box></ref>",
        [(None, B(1, 2, 3, 4), (6, 28))],
        ["stray </box> at 0", "stray </ref> at 28"],
    ),
    ("<ref>a<ref>b</ref><box>(1,2),(3,4)</box>", [("b", B(1, 2, 3, 4), (6, 40))], ["unclosed <ref> at 0"]),
    (
        "<ref>a<box>(1,2),(3,4)</box></ref>",
        [(None, B(1, 2, 3, 4), (6, 28))],
        ["unclosed <ref> at 0", "stray </ref> at 28"],
    ),
    ("<box>(1,2),(3,4)</quad>", [], ["unclosed <box> at 0", "stray </quad> at 16"]),
    ("<box>(1001,2),(3,4)</box>", [], ["<box> at 0: coordinate 1001 out of range 0..1000"]),
    ("<box>(-1,2),(3,4)</box>", [], ["<box> at 0: coordinate '-1' out of range 0..1000"]),
    ("<box>(1.5,2),(3,4)</box>", [], ["<box> at 0: non-integer coordinate '1.5'"]),
    ("<box>(１,2),(3,4)</box>", [], ["<box> at 0: non-integer coordinate '１'"]),
    ("<box>(,2),(3,4)</box>", [], ["<box> at 0: non-integer coordinate ''"]),
    ("<box>(1,2),(3,4),(5,6)</box>", [], ["<box> at 0: expected 2 points, got 3"]),
    ("<quad>(1,2),(3,4)</quad>", [], ["<quad> at 0: expected 4 points, got 2"]),
    ("<box>(1,2,3),(4,5)</box>", [], ["<box> at 0: point '(1,2,3)' does not have 2 coordinates"]),
    ("<box>1,2,3,4</box>", [], ["<box> at 0: malformed coordinates '1,2,3,4'"]),
    ("<box>(1,2)(3,4)</box>", [], ["<box> at 0: malformed coordinates '(1,2)(3,4)'"]),
    ("<box></box>", [], ["<box> at 0: malformed coordinates ''"]),
    ("<ref> </ref><box>(1,2),(3,4)</box>", [(None, B(1, 2, 3, 4), (0, 34))], ["empty <ref> at 0"]),
    ("<ref></ref>", [], ["empty <ref> at 0"]),
    (
        "<ref>a</ref><box>(1,2)</box><box>(5,6),(7,8)</box>",
        [("a", B(5, 6, 7, 8), (28, 50))],
        ["<box> at 12: expected 2 points, got 1"],
    ),
    (
        "Picture 1: <img>a.jpg</img>\n<ref>x</ref><box>(0,0),(1000,1000)</box>",
        [("x", B(0, 0, 1000, 1000), (28, END))],
        [],
    ),
    ("", [], []),
    ("no tags at all <b>bold</b> <img>x</img>", [], []),
]


@pytest.mark.parametrize("text, expected, problems", PARSE_CASES, ids=[repr(c[0])[:50] for c in PARSE_CASES])
def test_parse_cases(text, expected, problems):
    result = parse_grounding(text)
    want = [
        GroundedObject(label, shape, (start, len(text) if end == END else end))
        for label, shape, (start, end) in expected
    ]
    assert result.objects == want
    assert result.problems == problems
    assert result.boxes == [o.box for o in want]


def test_parse_huge_number_is_out_of_range():
    text = "<box>(" + "9" * 5000 + ",2),(3,4)</box>"
    result = parse_grounding(text)
    assert result.objects == []
    assert len(result.problems) == 1
    assert re.fullmatch(r"<box> at 0: coordinate '9{37}\.\.\.' out of range 0\.\.1000", result.problems[0])


def test_parse_rejects_non_str_without_raising():
    result = parse_grounding(None)  # type: ignore[arg-type]
    assert result.objects == [] and result.problems == ["expected str, got NoneType"]


# ----- hypothesis ----------------------------------------------------------------------------------------------

coordinate = st.integers(0, 1000)
boxes = st.builds(Box, coordinate, coordinate, coordinate, coordinate)
quads = st.builds(lambda pts: Quad(tuple(pts)), st.lists(st.tuples(coordinate, coordinate), min_size=4, max_size=4))
label_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).map(str.strip)
labels = st.one_of(
    st.none(),
    label_text.filter(
        lambda s: s and not any(t in s for t in ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"))
    ),
)
filler = st.text(st.characters(blacklist_characters="<"), max_size=10)


@st.composite
def valid_outputs(draw) -> tuple[str, list[tuple[str | None, Box | Quad]]]:
    """A text of grounded objects separated by text without tags, and the objects."""
    parts: list[str] = []
    objects: list[tuple[str | None, Box | Quad]] = []
    for _ in range(draw(st.integers(0, 4))):
        label, shape = draw(labels), draw(st.one_of(boxes, quads))
        parts.append(draw(filler.filter(lambda s: s.strip() != "" or s == "")) if parts else "")
        if parts[-1] == "" and objects:
            parts[-1] = "."  # keep objects apart so that a None label does not join the previous ref
        parts.append(format_box(shape, label))
        objects.append((label, shape))
    return "".join(parts) + draw(filler), objects


@st.composite
def mutated(draw, base: st.SearchStrategy[tuple[str, list]]) -> str:
    text, _ = draw(base)
    chars = list(text)
    alphabet = st.one_of(st.sampled_from(list("<>/(),0123456789-refboxquad ")), st.characters())
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        pos = draw(st.integers(0, len(chars)))
        if op == "insert":
            chars.insert(pos, draw(alphabet))
        elif chars and pos < len(chars):
            if op == "delete":
                del chars[pos]
            else:
                chars[pos] = draw(alphabet)
    return "".join(chars)


def _check_result(text: str) -> None:
    result = parse_grounding(text)
    assert isinstance(result.objects, list) and isinstance(result.problems, list)
    for obj in result.objects:
        assert 0 <= obj.span[0] < obj.span[1] <= len(text)
        assert isinstance(obj.box, (Box, Quad))
    assert all(isinstance(p, str) for p in result.problems)
    assert isinstance(strip_grounding(text), str)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises_on_any_text(text):
    _check_result(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(valid_outputs()))
def test_parse_never_raises_on_mutated_outputs(text):
    _check_result(text)


@settings(max_examples=200, deadline=None)
@given(valid_outputs())
def test_valid_outputs_parse_exactly(sample):
    text, objects = sample
    result = parse_grounding(text)
    assert result.problems == []
    assert [(o.label, o.box) for o in result.objects] == objects


@settings(max_examples=300, deadline=None)
@given(st.one_of(boxes, quads), labels)
def test_format_parse_round_trip(shape, label):
    text = format_box(shape, label)
    result = parse_grounding(text)
    assert result.problems == []
    assert result.objects == [GroundedObject(label, shape, (0, len(text)))]


def test_format_box_exact_strings():
    assert format_box(Box(1, 2, 3, 4), "the dog") == "<ref>the dog</ref><box>(1,2),(3,4)</box>"
    assert format_box((0, 0, 1000, 1000)) == "<box>(0,0),(1000,1000)</box>"
    assert format_box(Quad(((1, 2), (3, 4), (5, 6), (7, 8)))) == "<quad>(1,2),(3,4),(5,6),(7,8)</quad>"


def test_format_box_matches_from_list_format(tokenizer):
    box = Box(100, 200, 300, 400)
    assert format_box(box, "the dog") == tokenizer.from_list_format([{"ref": "the dog", "box": [(100, 200, 300, 400)]}])


@pytest.mark.parametrize("label", ["", "  ", "a<box>b", "x</ref>"])
def test_format_box_rejects_bad_labels(label):
    with pytest.raises(ValueError):
        format_box(Box(1, 2, 3, 4), label)


@pytest.mark.parametrize(
    "args, error",
    [
        ((1, 2, 3, 1001), ValueError),
        ((-1, 2, 3, 4), ValueError),
        ((1.0, 2, 3, 4), TypeError),
        ((True, 2, 3, 4), TypeError),
    ],
)
def test_box_validates_coordinates(args, error):
    with pytest.raises(error):
        Box(*args)


def test_quad_validates_points():
    with pytest.raises(ValueError):
        Quad(((1, 2), (3, 4), (5, 6)))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Quad(((1, 2), (3, 4), (5, 6), (7, 1001)))
    assert Quad([[1, 2], [3, 4], [5, 6], [7, 8]]).points == ((1, 2), (3, 4), (5, 6), (7, 8))  # type: ignore[arg-type]


def test_strip_grounding():
    text = "A <ref>dog</ref><box>(1,2),(3,4)</box> and <ref>猫</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>!"
    assert strip_grounding(text) == "A dog and 猫!"
    assert strip_grounding("x <box>(1,2)</box> y") == "x  y"
    assert strip_grounding("unclosed <box>(1,2) then <box>(1,2),(3,4)</box>.") == "unclosed (1,2) then ."
    assert strip_grounding("plain") == "plain"


# ----- coordinates ---------------------------------------------------------------------------------------------


def test_box_to_pixels_hand_computed():
    box = Box(100, 250, 500, 1000)
    assert box.to_pixels(640, 480) == PixelBox(64.0, 120.0, 320.0, 480.0)
    assert Box(333, 1, 999, 0).to_pixels(100, 10) == PixelBox(33.3, 0.01, 99.9, 0.0)
    assert Box(333, 1, 999, 0).to_pixel_ints(100, 10) == (33, 0, 100, 0)
    assert Box(5, 15, 25, 35).to_pixels(100, 100).rounded() == (1, 2, 3, 4)  # halves go up
    assert Box(5, 15, 25, 35).to_pixels(100, 100).rounded("floor") == (0, 1, 2, 3)


def test_pixels_to_normalised_hand_computed():
    assert PixelBox(64, 120, 320, 480).to_normalised(640, 480) == Box(100, 250, 500, 1000)
    assert PixelBox(33.3, 0.01, 99.9, 0).to_normalised(100, 10) == Box(333, 0, 999, 1)  # ordered
    assert PixelBox(-5, 10, 700, 2000).to_normalised(640, 480) == Box(0, 21, 1000, 1000)  # clamped
    assert PixelBox(300, 400, 100, 200).to_normalised(1000, 1000) == Box(100, 200, 300, 400)
    with pytest.raises(ValueError):
        PixelBox(0, 0, 1, 1).to_normalised(0, 10)
    with pytest.raises(ValueError):
        PixelBox(float("nan"), 0, 1, 1).to_normalised(10, 10)


def test_quad_to_pixels_and_bounds():
    quad = Quad(((100, 200), (900, 100), (800, 900), (0, 1000)))
    assert quad.to_pixels(10, 20) == [(1.0, 4.0), (9.0, 2.0), (8.0, 18.0), (0.0, 20.0)]
    assert quad.bounds() == Box(0, 100, 900, 1000)


sizes = st.integers(1, 5000)


@settings(max_examples=300, deadline=None)
@given(boxes, sizes, sizes)
def test_normalised_pixel_round_trip(box, width, height):
    back = box.to_pixels(width, height).to_normalised(width, height)
    ordered = box.ordered()
    for a, b in zip((back.x1, back.y1, back.x2, back.y2), (ordered.x1, ordered.y1, ordered.x2, ordered.y2)):
        assert abs(a - b) <= 1


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.data())
def test_pixel_normalised_round_trip(width, height, data):
    x1, x2 = sorted(data.draw(st.lists(st.floats(0, width), min_size=2, max_size=2)))
    y1, y2 = sorted(data.draw(st.lists(st.floats(0, height), min_size=2, max_size=2)))
    back = PixelBox(x1, y1, x2, y2).to_normalised(width, height).to_pixels(width, height)
    for a, b, size in ((back.x1, x1, width), (back.y1, y1, height), (back.x2, x2, width), (back.y2, y2, height)):
        assert abs(a - b) <= size / 1000 / 2 + 1e-9  # within half a normalised unit


# ----- prompts -------------------------------------------------------------------------------------------------


def test_prompts():
    assert ref_prompt("the dog") == "<ref>the dog</ref>"
    assert chat_grounding_prompt("the dog") == 'Output the bounding box of "the dog"'
    assert chat_grounding_prompt("击掌", language="zh") == "框出图中击掌的位置"
    assert grounded_caption_prompt() == "Generate the caption in English with grounding:"
    assert region_prompt(Box(1, 2, 3, 4)) == "<box>(1,2),(3,4)</box>"
    assert chat_region_prompt((1, 2, 3, 4)) == "What is in <box>(1,2),(3,4)</box>?"
    assert (
        chat_region_prompt(Box(1, 2, 3, 4), "Describe {region} briefly.") == "Describe <box>(1,2),(3,4)</box> briefly."
    )
    with pytest.raises(ValueError):
        chat_grounding_prompt("x", language="fr")
    with pytest.raises(ValueError):
        chat_region_prompt(Box(1, 2, 3, 4), "no placeholder")


def test_ref_prompt_tokens(tokenizer):
    ids = tokenizer.encode(ref_prompt("the dog"))
    assert ids[0] == tokenizer.ref_start_id and ids[-1] == tokenizer.ref_end_id


# ----- drawing -------------------------------------------------------------------------------------------------

WHITE = (255, 255, 255)


def _font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size)


def test_draw_box_edges_and_copy():
    image = Image.new("RGB", (100, 80), WHITE)
    before = image.tobytes()
    out = draw_grounding(image, [Box(100, 100, 500, 500)], line_width=1)
    assert image.tobytes() == before and out is not image
    assert out.size == (100, 80) and out.mode == "RGB"
    # floor(100 * 100 / 1000) = 10, floor(100 * 80 / 1000) = 8, 50, 40
    for xy in [(10, 8), (50, 40), (10, 20), (50, 20), (30, 8), (30, 40)]:
        assert out.getpixel(xy) == PALETTE[0], xy
    for xy in [(11, 20), (30, 24), (49, 39), (9, 20), (51, 20), (30, 7), (30, 41), (0, 0)]:
        assert out.getpixel(xy) == WHITE, xy


def test_draw_clamps_full_image_box_inside():
    out = draw_grounding(Image.new("RGB", (50, 40), WHITE), [Box(0, 0, 1000, 1000)], line_width=1)
    for xy in [(0, 0), (49, 39), (49, 20), (25, 39), (0, 20)]:
        assert out.getpixel(xy) == PALETTE[0], xy
    assert out.getpixel((25, 20)) == WHITE


def test_draw_reversed_corners_and_quad():
    image = Image.new("RGB", (100, 100), WHITE)
    out = draw_grounding(image, [Box(500, 500, 100, 100)], line_width=1)
    assert out.getpixel((10, 30)) == PALETTE[0] and out.getpixel((50, 30)) == PALETTE[0]
    quad = Quad(((200, 200), (800, 200), (800, 800), (200, 800)))
    out = draw_grounding(image, [quad], line_width=1)
    for xy in [(50, 20), (80, 50), (50, 80), (20, 50)]:
        assert out.getpixel(xy) == PALETTE[0], xy
    assert out.getpixel((50, 50)) == WHITE


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "RGB"])
def test_draw_returns_rgb_copy_for_any_mode(mode):
    image = Image.new(mode, (64, 48))
    before = (image.mode, image.size, image.tobytes())
    out = draw_grounding(image, parse_grounding("<ref>x</ref><box>(100,100),(900,900)</box>"), font=_font())
    assert (image.mode, image.size, image.tobytes()) == before
    assert out.mode == "RGB" and out.size == (64, 48)
    assert out.tobytes() != image.convert("RGB").tobytes()


def test_draw_nothing_gives_an_equal_copy():
    image = Image.new("RGB", (20, 10), (1, 2, 3))
    out = draw_grounding(image, [])
    assert out is not image and out.tobytes() == image.tobytes()


def _count(image: Image.Image, colour, box) -> int:
    pixels = np.asarray(image.crop(box))
    return int(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1).sum())


def test_label_background_above_box():
    image = Image.new("RGB", (200, 200), WHITE)
    objects = parse_grounding("<ref>dog</ref><box>(250,500),(750,900)</box>").objects
    out = draw_grounding(image, objects, font=_font(12), line_width=1)
    # the box starts at (50, 100); the label hangs above it
    above = _count(out, PALETTE[0], (50, 80, 80, 100))
    assert above > 100
    assert _count(out, WHITE, (50, 80, 80, 100)) > 0  # text ink (white on the dark blue)
    assert _count(out, PALETTE[0], (0, 0, 200, 70)) == 0  # nothing far above


def test_label_inside_when_box_touches_top():
    image = Image.new("RGB", (200, 200), WHITE)
    objects = parse_grounding("<ref>dog</ref><box>(250,0),(750,900)</box>").objects
    out = draw_grounding(image, objects, font=_font(12), line_width=1)
    assert _count(out, PALETTE[0], (51, 1, 80, 15)) > 100  # label background inside the box
    assert _count(out, PALETTE[0], (51, 30, 149, 100)) == 0  # the rest of the inside is untouched


def test_label_stays_inside_image_on_the_right():
    image = Image.new("RGB", (100, 100), WHITE)
    objects = parse_grounding("<ref>a long label</ref><box>(950,500),(1000,900)</box>").objects
    out = draw_grounding(image, objects, font=_font(12), line_width=1)
    assert _count(out, PALETTE[0], (30, 30, 95, 50)) > 100  # shifted left to fit


def test_colours_per_label():
    text = "<ref>a</ref><box>(0,0),(100,100)</box> <ref>b</ref><box>(200,200),(300,300)</box> <ref>a</ref><box>(400,400),(500,500)</box> and <box>(600,600),(700,700)</box>"
    out = draw_grounding(Image.new("RGB", (1000, 1000), WHITE), parse_grounding(text), font=_font(), line_width=1)
    assert out.getpixel((0, 50)) == PALETTE[0]
    assert out.getpixel((200, 250)) == PALETTE[1]
    assert out.getpixel((400, 450)) == PALETTE[0]  # same label, same colour
    assert out.getpixel((600, 650)) == PALETTE[2]  # unlabelled: its own colour


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=12).filter(str.strip), st.booleans(), boxes)
def test_draw_any_label_with_any_font(label, bitmap, box):
    font = ImageFont.load_default_imagefont() if bitmap else _font(14)
    image = Image.new("RGB", (60, 40), WHITE)
    out = draw_grounding(image, [GroundedObject(label.strip(), box, (0, 1))], font=font, line_width=1)
    assert out.size == (60, 40) and out.mode == "RGB"


def test_bitmap_font_draws_cjk_as_placeholders():
    objects = parse_grounding("<ref>狗 dog</ref><box>(100,500),(900,900)</box>").objects
    out = draw_grounding(Image.new("RGB", (100, 100), WHITE), objects, font=ImageFont.load_default_imagefont())
    assert _count(out, PALETTE[0], (0, 0, 100, 50)) > 50


def test_draw_rejects_other_objects():
    with pytest.raises(TypeError):
        draw_grounding(Image.new("RGB", (10, 10)), [(1, 2, 3, 4)])  # type: ignore[list-item]


def test_has_cjk_glyphs_rejects_latin_only_fonts():
    assert not has_cjk_glyphs(_font(24))


def test_find_cjk_font_does_not_trust_names(tmp_path, monkeypatch):
    monkeypatch.delenv(FONT_ENV, raising=False)
    (tmp_path / "wqy-zenhei.ttc").write_bytes(b"not a font")
    (tmp_path / "NotoSansCJK-Regular.otf").write_bytes(b"")
    assert find_cjk_font(tmp_path / "wqy-zenhei.ttc", search_dirs=[tmp_path], use_fontconfig=False) is None
    monkeypatch.setenv(FONT_ENV, str(tmp_path / "missing.ttf"))
    assert find_cjk_font(search_dirs=[tmp_path], use_fontconfig=False) is None


def test_missing_cjk_font_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(fonts_module, "find_cjk_font", lambda *a, **k: None)
    image = Image.new("RGB", (100, 100), WHITE)
    objects = parse_grounding("<ref>狗</ref><box>(100,500),(900,900)</box>").objects
    with pytest.warns(RuntimeWarning, match=FONT_ENV):
        out = draw_grounding(image, objects)
    assert out.getpixel((10, 70)) == PALETTE[0]
    ascii_objects = parse_grounding("<ref>dog</ref><box>(100,500),(900,900)</box>").objects
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draw_grounding(image, ascii_objects)


@needs_cjk_font
def test_find_cjk_font_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(FONT_ENV, str(CJK_FONT))
    assert find_cjk_font(search_dirs=[tmp_path], use_fontconfig=False) == CJK_FONT
    assert find_cjk_font(CJK_FONT, search_dirs=[tmp_path], use_fontconfig=False) == CJK_FONT
    assert has_cjk_glyphs(ImageFont.truetype(str(CJK_FONT), 20))


@needs_cjk_font
def test_cjk_label_renders_real_glyphs():
    image = Image.new("RGB", (300, 300), WHITE)
    crops = []
    for label in ("中", "文"):
        objects = parse_grounding(f"<ref>{label}</ref><box>(100,500),(900,900)</box>").objects
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = draw_grounding(image, objects, font_size=40, line_width=1)
        crop = out.crop((30, 100, 90, 150))
        assert _count(crop, WHITE, (0, 0, *crop.size)) > 30  # ink on the label background
        crops.append(crop.tobytes())
    assert crops[0] != crops[1]  # two different glyphs, not one missing-glyph box


@needs_cjk_font
def test_mixed_labels_use_a_font_per_character():
    fonts = [ImageFont.truetype(str(CJK_FONT), 20), _font(20)]
    runs = split_runs("小狗 dog 2", fonts)
    assert "".join(run for run, _ in runs) == "小狗 dog 2"
    for run, font in runs:
        assert all(has_glyph(font, ch) for ch in run if not ch.isspace())


# ----- latest picture ------------------------------------------------------------------------------------------


@pytest.fixture()
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "pic.png"
    Image.new("RGB", (200, 100), WHITE).save(path)
    return path


def test_latest_picture_order(tokenizer):
    history = [
        ("Picture 1: <img>old.png</img>\nhi", "hello"),
        ("Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\nwhat?", "<img>not-searched.png</img>"),
        ("<ref>dog</ref>", None),
    ]
    assert latest_picture("<box>(1,2),(3,4)</box>", history, tokenizer) == "b.png"
    assert latest_picture("<img>r.png</img>", history, tokenizer) == "r.png"  # the response comes first
    assert latest_picture("x", history[:1], tokenizer) == "old.png"
    assert latest_picture("x", [], tokenizer) is None
    assert latest_picture("x", None, None) is None
    assert latest_picture("x", [["<|im_start|> <img>c.png</img>", "y"]], tokenizer) == "c.png"  # fallback search


def test_draw_bbox_on_latest_picture(tokenizer, picture):
    query = tokenizer.from_list_format([{"image": str(picture)}, {"text": "Where is the dog?"}])
    history = [(query, "There is a dog.")]
    response = "<ref>the dog</ref><box>(100,200),(500,800)</box>"
    policy = ImagePolicy(allowed_roots=(picture.parent,))
    out = draw_bbox_on_latest_picture(response, history, tokenizer, policy=policy, line_width=1)
    assert out is not None and out.size == (200, 100) and out.mode == "RGB"
    assert out.getpixel((20, 50)) == PALETTE[0]  # left edge at floor(100 * 200 / 1000)
    assert out.getpixel((60, 50)) == WHITE
    same = tokenizer.draw_bbox_on_latest_picture(response, history, policy=policy)
    assert same is not None and same.getpixel((20, 50)) == PALETTE[0]


def test_draw_bbox_returns_none_without_boxes_or_picture(tokenizer, picture):
    history = [(f"Picture 1: <img>{picture}</img>\nhi", "hello")]
    policy = ImagePolicy(allowed_roots=(picture.parent,))
    assert draw_bbox_on_latest_picture("no boxes here", history, tokenizer, policy=policy) is None
    assert draw_bbox_on_latest_picture("<box>(1,2)</box>", history, tokenizer, policy=policy) is None
    assert draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>", [("hi", "x")], tokenizer, policy=policy) is None
    assert tokenizer.draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>") is None


def test_draw_bbox_refuses_pictures_outside_the_policy(tokenizer, picture, tmp_path):
    history = [(f"Picture 1: <img>{picture}</img>\nhi", "hello")]
    elsewhere = ImagePolicy(allowed_roots=(tmp_path / "other",))
    with pytest.raises(ImageLoadError, match="outside allowed roots"):
        draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>", history, tokenizer, policy=elsewhere)
    with pytest.raises(ImageLoadError):  # default policy: the working directory only
        tokenizer.draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>", history)
    url_history = [("Picture 1: <img>http://example.com/a.png</img>\nhi", "x")]
    with pytest.raises(ImageLoadError, match="URL fetching is disabled"):
        tokenizer.draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>", url_history)


# ----- saving --------------------------------------------------------------------------------------------------


def test_save_annotated_is_atomic(tmp_path):
    image = draw_grounding(Image.new("RGB", (30, 20), WHITE), [Box(0, 0, 500, 500)])
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    assert save_annotated(image, target) == target
    with Image.open(target) as saved:
        assert saved.format == "PNG" and saved.tobytes() == image.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    save_annotated(image, tmp_path / "out.jpg")
    with Image.open(tmp_path / "out.jpg") as saved:
        assert saved.format == "JPEG"
    with pytest.raises(ValueError, match="format"):
        save_annotated(image, tmp_path / "out.unknown")
    with pytest.raises(KeyError):
        save_annotated(image, tmp_path / "x.png", format="NOPE")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jpg", "out.png"]


def test_public_names():
    assert set(grounding.__all__) <= set(dir(grounding))


# ----- docs ----------------------------------------------------------------------------------------------------

DOC = REPO_ROOT / "docs" / "grounding.md"
DOC_EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S) if DOC.exists() else []


def test_docs_have_examples():
    assert len(DOC_EXAMPLES) >= 3


@pytest.mark.parametrize("index", range(len(DOC_EXAMPLES)))
def test_docs_example_runs(index, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    code = compile(DOC_EXAMPLES[index], f"docs/grounding.md example {index}", "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no CJK font on this machine: not the point here
        exec(code, {"__name__": f"docs_grounding_{index}"})
