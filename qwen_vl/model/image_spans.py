"""Find ``<img>…</img>`` spans in token ids and read the image reference they carry.

A span is ``<img>``, 256 ids, ``</img>``: the UTF-8 bytes of the image path or URL
(ids 0-255) padded with ``<imgpad>``. The 256 inner positions receive the image's
features; the two tags keep their own embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSpan:
    row: int  # batch row
    start: int  # index of <img>
    end: int  # index of </img>


def find_image_spans(input_ids: torch.Tensor, image_start_id: int, span_length: int = 256) -> list[ImageSpan]:
    """All image spans of ``input_ids`` (B, T), row by row, left to right.

    Raises ValueError naming the row and position when a span is unclosed, nested,
    or does not hold exactly ``span_length`` positions.
    """
    image_end_id = image_start_id + 1
    starts = (input_ids == image_start_id).nonzero().tolist()
    ends = (input_ids == image_end_id).nonzero().tolist()
    if not starts and not ends:
        return []
    spans: list[ImageSpan] = []
    by_row: dict[int, list[tuple[int, str]]] = {}
    for row, pos in starts:
        by_row.setdefault(row, []).append((pos, "start"))
    for row, pos in ends:
        by_row.setdefault(row, []).append((pos, "end"))
    for row in sorted(by_row):
        open_pos: int | None = None
        for pos, kind in sorted(by_row[row]):
            if kind == "start":
                if open_pos is not None:
                    raise ValueError(
                        f"row {row}: <img> at position {pos} opens inside the image span opened at {open_pos}"
                    )
                open_pos = pos
                continue
            if open_pos is None:
                raise ValueError(f"row {row}: </img> at position {pos} closes no <img>")
            if pos - open_pos - 1 != span_length:
                raise ValueError(
                    f"row {row}: image span at positions {open_pos}..{pos} holds {pos - open_pos - 1} ids, "
                    f"expected {span_length}"
                )
            spans.append(ImageSpan(row=row, start=open_pos, end=pos))
            open_pos = None
        if open_pos is not None:
            raise ValueError(f"row {row}: <img> at position {open_pos} is never closed")
    return spans


def span_reference(input_ids: torch.Tensor, span: ImageSpan, image_pad_id: int) -> str:
    """The path or URL written in ``span``: its bytes before the first ``<imgpad>``."""
    inner = input_ids[span.row, span.start + 1 : span.end].tolist()
    if image_pad_id not in inner:
        raise ValueError(
            f"row {span.row}: image span at {span.start}..{span.end} has no <imgpad>: a reference must be "
            "at most 255 bytes to be read back"
        )
    data = inner[: inner.index(image_pad_id)]
    if any(not 0 <= b < 256 for b in data):
        raise ValueError(f"row {span.row}: image span at {span.start}..{span.end} holds ids that are not bytes")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"row {span.row}: image span at {span.start}..{span.end} is not valid UTF-8: {e}") from None
