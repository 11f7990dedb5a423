"""Drawing a reply's boxes on the latest picture of a conversation."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from PIL import Image

from qwen_vl.grounding.draw import draw_grounding
from qwen_vl.grounding.parse import parse_grounding
from qwen_vl.images import ImagePolicy, load_image

_IMAGE_SPAN = re.compile(r"<img>(.*?)</img>", re.S)

History = Sequence[tuple[str, str | None] | Sequence[Any]]


class _ListFormatTokenizer(Protocol):
    def to_list_format(self, text: str) -> list[dict[str, str]]: ...


def _images_in(text: str, tokenizer: _ListFormatTokenizer | None) -> list[str]:
    """The ``<img>`` sources of ``text`` in order (the tokenizer's reading when it accepts the text)."""
    if tokenizer is not None:
        try:
            return [e["image"] for e in tokenizer.to_list_format(text) if "image" in e]
        except (ValueError, TypeError):
            pass  # e.g. a typed <|im_start|>: fall back to a plain search of the tags
    return _IMAGE_SPAN.findall(text)


def latest_picture(
    response: str, history: History | None = None, tokenizer: _ListFormatTokenizer | None = None
) -> str | None:
    """The source of the newest ``<img>`` in the conversation, as the official tokenizer
    looks for it: the response first, then the queries of ``history`` from the newest turn
    back (responses in ``history`` are not searched); within a text, the last image."""
    texts = [response] + [turn[0] for turn in reversed(list(history or [])) if turn]
    for text in texts:
        if not isinstance(text, str):
            continue
        images = _images_in(text, tokenizer)
        if images:
            return images[-1]
    return None


def draw_bbox_on_latest_picture(
    response: str,
    history: History | None = None,
    tokenizer: _ListFormatTokenizer | None = None,
    policy: ImagePolicy | None = None,
    **draw_options: Any,
) -> Image.Image | None:
    """The latest picture of the conversation with the boxes and quads of ``response``
    drawn on it, or None when ``response`` has no valid box or there is no picture.

    The picture is opened with ``load_image(source, policy)`` (default ``ImagePolicy()``:
    files under the working directory, no URLs), so a refused source raises
    ``ImageLoadError``. ``draw_options`` go to ``draw_grounding`` (font, line_width, ...).
    """
    objects = parse_grounding(response).objects
    if not objects:
        return None
    source = latest_picture(response, history, tokenizer)
    if source is None:
        return None
    image = load_image(source, policy if policy is not None else ImagePolicy())
    return draw_grounding(image, objects, **draw_options)
