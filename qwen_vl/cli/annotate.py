"""Boxes in an answer: as JSON, and drawn on the conversation's latest picture.

The grounding package is imported only when needed, so the command works
without it (``boxes`` is then None and nothing is drawn).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .image_store import ImageStore, image_refs

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _grounding() -> Any | None:
    try:
        from .. import grounding
    except ImportError:
        return None
    return grounding


def grounding_available() -> bool:
    """Whether ``qwen_vl.grounding`` can be imported."""
    return _grounding() is not None


def parse_boxes(text: str) -> list[dict[str, Any]] | None:
    """``[{"label", "box": [x1, y1, x2, y2]} or {"label", "quad": [[x, y] x4]}]`` (0-1000
    coordinates) for the boxes in ``text``; None when grounding is unavailable."""
    grounding = _grounding()
    if grounding is None:
        return None
    out: list[dict[str, Any]] = []
    for obj in grounding.parse_grounding(text).objects:
        shape = obj.box
        if hasattr(shape, "points"):
            out.append({"label": obj.label, "quad": [list(p) for p in shape.points]})
        else:
            out.append({"label": obj.label, "box": [shape.x1, shape.y1, shape.x2, shape.y2]})
    return out


def latest_image_ref(response: str, queries: Sequence[str]) -> str | None:
    """The newest ``<img>`` of a conversation: in the response, else in the queries from the newest."""
    for text in [response, *reversed(list(queries))]:
        refs = image_refs(text)
        if refs:
            return refs[-1]
    return None


def _free_path(save_dir: Path, stem: str) -> Path:
    safe = _UNSAFE.sub("_", stem).strip("._") or "image"
    index = 1
    while (save_dir / f"{safe}-boxes-{index}.png").exists():
        index += 1
    return save_dir / f"{safe}-boxes-{index}.png"


def save_boxes(response: str, queries: Sequence[str], store: ImageStore, save_dir: str | Path) -> Path | None:
    """Draw ``response``'s boxes on the latest picture of the conversation (``queries``
    oldest first, the current one last) and save it under ``save_dir``.

    Returns the written path, or None when there are no boxes, no loaded picture,
    or no grounding package.
    """
    grounding = _grounding()
    if grounding is None:
        return None
    objects = grounding.parse_grounding(response).objects
    if not objects:
        return None
    ref = latest_image_ref(response, queries)
    if ref is None or ref not in store.images:
        return None
    folder = Path(save_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    drawn = grounding.draw_grounding(store.images[ref], objects)
    return Path(grounding.save_annotated(drawn, _free_path(folder, Path(ref).stem)))
