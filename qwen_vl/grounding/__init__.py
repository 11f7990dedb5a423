"""Grounding: Qwen-VL's ``<ref>``/``<box>``/``<quad>`` tags as typed objects, prompts for
the grounding tasks, and drawing the boxes on images.

Coordinates are integers in a 0-1000 space on both axes, whatever the image size.
"""

from qwen_vl.grounding.draw import PALETTE, draw_grounding, save_annotated
from qwen_vl.grounding.fonts import (
    FONT_ENV,
    clear_font_cache,
    find_cjk_font,
    has_cjk_glyphs,
    has_glyph,
    load_label_fonts,
    split_runs,
)
from qwen_vl.grounding.latest import draw_bbox_on_latest_picture, latest_picture
from qwen_vl.grounding.objects import SCALE, Box, GroundedObject, ParseResult, PixelBox, Quad
from qwen_vl.grounding.parse import format_box, parse_grounding, strip_grounding
from qwen_vl.grounding.prompts import (
    GROUNDED_CAPTION,
    chat_grounding_prompt,
    chat_region_prompt,
    grounded_caption_prompt,
    ref_prompt,
    region_prompt,
)

__all__ = [
    "FONT_ENV",
    "GROUNDED_CAPTION",
    "PALETTE",
    "SCALE",
    "Box",
    "GroundedObject",
    "ParseResult",
    "PixelBox",
    "Quad",
    "chat_grounding_prompt",
    "chat_region_prompt",
    "clear_font_cache",
    "draw_bbox_on_latest_picture",
    "draw_grounding",
    "find_cjk_font",
    "format_box",
    "grounded_caption_prompt",
    "has_cjk_glyphs",
    "latest_picture",
    "has_glyph",
    "load_label_fonts",
    "parse_grounding",
    "ref_prompt",
    "region_prompt",
    "save_annotated",
    "split_runs",
    "strip_grounding",
]
