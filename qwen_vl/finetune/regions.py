"""Regions an answer is about, and the look targets they give the look loss.

An assistant turn may carry ``"regions"``: where in its pictures the answer's facts are::

    {"from": "assistant", "value": "A red circle and a blue square.",
     "regions": [{"image": 1, "box": [100, 120, 300, 340]},
                 {"image": 1, "box": [600, 500, 820, 760], "start": 14}]}

``image`` numbers the record's pictures from 1 in the order their ``<img>`` spans appear,
``box`` is ``[x1, y1, x2, y2]`` on the 0-1000 scale of grounding boxes, and ``start`` (default 0)
is the character of ``value`` from which the region applies: every answer token from there up to
the next larger ``start`` looks at the union of the boxes given for its start.

With ``finetune --look-loss-weight W`` each such token's predicting position is asked to attend,
in one attention head, to the picture cells inside its boxes (``finetune.look_loss``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.dense_targets import cells_within
from ..tokenizer import QWenTokenizer
from .supervised import IGNORE_INDEX, Encoded

REGION_FIELDS = ("image", "box", "start")


class RegionError(ValueError):
    """A region that does not fit its conversation; ``turn`` indexes the conversation's turns."""

    def __init__(self, turn: int, message: str) -> None:
        super().__init__(message)
        self.turn = turn


@dataclass(frozen=True)
class Region:
    """A box (0-1000 scale) in picture ``image`` (from 1) that answer text from ``start`` is about."""

    image: int
    box: tuple[int, int, int, int]
    start: int = 0


@dataclass(frozen=True)
class LookTarget:
    """Position ``query`` (it predicts an answer token) should attend to the positions ``keys``;
    ``weight`` shares one unit among the targets of a turn."""

    query: int
    keys: tuple[int, ...]
    weight: float


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_regions(value: Any, where: str, answer: str, fail: Callable[[str, str], None]) -> tuple[Region, ...]:
    """The regions of one assistant turn; each problem is reported through ``fail(field, message)``."""
    if not isinstance(value, list):
        fail(where, f"expected an array of regions, got {type(value).__name__}")
        return ()
    regions: list[Region] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            fail(at, "expected an object with 'image' and 'box'")
            continue
        bad = False
        for key in item:
            if key not in REGION_FIELDS:
                fail(f"{at}.{key}", f"unknown field (a region has {', '.join(REGION_FIELDS)})")
                bad = True
        image, box, start = item.get("image"), item.get("box"), item.get("start", 0)
        if not _is_int(image) or image < 1:
            fail(f"{at}.image", f"expected a picture number from 1, got {image!r}")
            bad = True
        if not (isinstance(box, list) and len(box) == 4 and all(_is_int(v) for v in box)):
            fail(f"{at}.box", f"expected [x1, y1, x2, y2] as 4 integers, got {box!r}")
            bad = True
        elif not (0 <= box[0] <= box[2] <= 1000 and 0 <= box[1] <= box[3] <= 1000):
            fail(f"{at}.box", f"expected 0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000, got {box}")
            bad = True
        if not _is_int(start) or not 0 <= start < len(answer):
            fail(f"{at}.start", f"expected a character index of the answer (0 to {len(answer) - 1}), got {start!r}")
            bad = True
        if not bad:
            regions.append(Region(image, tuple(box), start))  # type: ignore[arg-type]
    return tuple(regions)


def box_cells(box: Sequence[int], grid: int) -> list[int]:
    """Row-major indices of the ``grid x grid`` cells whose centres lie in ``box`` (0-1000 scale);
    the cell under the box's centre when no centre does (a box smaller than a cell)."""
    x1, y1, x2, y2 = box
    rows = cells_within(y1, y2, grid, 1000) or [min(grid - 1, int((y1 + y2) / 2000 * grid))]
    cols = cells_within(x1, x2, grid, 1000) or [min(grid - 1, int((x1 + x2) / 2000 * grid))]
    return [i * grid + j for i in rows for j in cols]


def _token_bytes(tokenizer: QWenTokenizer, ids: Sequence[int]) -> list[int]:
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    return [len(t) if isinstance(t, bytes) else len(t.encode("utf-8")) for t in tokens]


def look_targets(
    tokenizer: QWenTokenizer,
    encoded: Encoded,
    answers: Sequence[str],
    regions: Sequence[Sequence[Region]],
    image_start_id: int,
    n_queries: int,
) -> list[LookTarget]:
    """Look targets of an encoded conversation: for every answer token a region covers, the
    position predicting it and the image positions of its boxes' cells.

    ``answers[k]`` and ``regions[k]`` belong to the k-th kept assistant turn. Raises ``RegionError``
    when a region's picture number exceeds the pictures shown up to that answer.
    """
    grid = math.isqrt(n_queries)
    ids = encoded.input_ids
    span_starts = [i for i, t in enumerate(ids) if t == image_start_id]  # picture k's <img> at span_starts[k - 1]
    targets: list[LookTarget] = []
    begin = 0
    for k, end in enumerate(encoded.turn_ends):
        turn_regions = regions[k] if k < len(regions) else ()
        if turn_regions:
            answer_pos = [p for p in range(begin, end - 1) if encoded.labels[p] != IGNORE_INDEX]  # without <|im_end|>
            seen = sum(1 for s in span_starts if s < end)
            by_start: dict[int, list[int]] = {}
            for r in turn_regions:
                if r.image > seen:
                    raise RegionError(
                        2 * k + 1, f"picture {r.image}, but the conversation shows {seen} up to this answer"
                    )
                first = span_starts[r.image - 1] + 1
                keys = by_start.setdefault(len(answers[k][: r.start].encode("utf-8")), [])
                keys.extend(first + c for c in box_cells(r.box, grid))
            starts = sorted(by_start)
            turn: list[tuple[int, tuple[int, ...]]] = []
            offset = 0
            for p, size in zip(answer_pos, _token_bytes(tokenizer, [ids[p] for p in answer_pos])):
                applying = [s for s in starts if s <= offset]
                if applying:
                    turn.append((p - 1, tuple(sorted(set(by_start[applying[-1]])))))
                offset += size
            targets += [LookTarget(q, keys, 1.0 / len(turn)) for q, keys in turn]
        begin = end
    return targets
