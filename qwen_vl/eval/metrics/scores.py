"""The result type shared by the corpus-level metric functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["canonical", "qwen"]
MODES: tuple[str, ...] = ("canonical", "qwen")


@dataclass(frozen=True)
class Scores:
    """Per-item scores in input order and their mean (0.0 for no items)."""

    per_item: list[float]
    mean: float


def scores_of(per_item: Sequence[float]) -> Scores:
    """``Scores`` with ``mean = sum(per_item) / len(per_item)``."""
    values = [float(v) for v in per_item]
    return Scores(values, sum(values) / len(values) if values else 0.0)


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is ``"canonical"`` or ``"qwen"``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_lengths(name_a: str, a: Sequence[object], name_b: str, b: Sequence[object]) -> None:
    """Raise ``ValueError`` when two parallel sequences differ in length."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}")
