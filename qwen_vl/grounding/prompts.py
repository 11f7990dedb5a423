"""Prompts for the common grounding tasks, in the forms the official models were shown.

The base model (Qwen-VL) continues tagged text; the chat model (Qwen-VL-Chat) answers
plain instructions. Each prompt goes after the image, e.g.
``tokenizer.from_list_format([{"image": path}, {"text": prompt}])``.
"""

from __future__ import annotations

from qwen_vl.grounding.objects import Box, Quad
from qwen_vl.grounding.parse import format_box

#: Grounded captioning instruction of the base model.
GROUNDED_CAPTION = "Generate the caption in English with grounding:"


def ref_prompt(expression: str) -> str:
    """Referring-expression grounding for the base model Qwen-VL: ``<ref>expression</ref>``;
    the model continues with ``<box>(x1,y1),(x2,y2)</box>``."""
    return f"<ref>{expression}</ref>"


def chat_grounding_prompt(expression: str, language: str = "en") -> str:
    """Referring-expression grounding for Qwen-VL-Chat: ``Output the bounding box of "expression"``
    (``language="en"``) or ``框出图中expression的位置`` (``language="zh"``); the reply holds
    ``<ref>…</ref><box>…</box>``."""
    if language == "en":
        return f'Output the bounding box of "{expression}"'
    if language == "zh":
        return f"框出图中{expression}的位置"
    raise ValueError(f"language must be 'en' or 'zh', got {language!r}")


def grounded_caption_prompt() -> str:
    """Grounded captioning for the base model Qwen-VL: the caption comes back with
    ``<ref>phrase</ref><box>…</box>`` for each grounded phrase."""
    return GROUNDED_CAPTION


def region_prompt(box: Box | Quad | tuple[int, int, int, int]) -> str:
    """Region description for the base model Qwen-VL: the box alone,
    ``<box>(x1,y1),(x2,y2)</box>``; the model continues with what is in that region."""
    return format_box(box)


def chat_region_prompt(box: Box | Quad | tuple[int, int, int, int], question: str = "What is in {region}?") -> str:
    """Region description for Qwen-VL-Chat: ``What is in <box>(x1,y1),(x2,y2)</box>?``
    (``question`` is any text with a ``{region}`` placeholder)."""
    if "{region}" not in question:
        raise ValueError("question must contain the placeholder {region}")
    return question.replace("{region}", format_box(box))
