"""Fitting a conversation into the model's context.

``make_context`` already windows the history to ``max_window_size`` tokens the way
the official code does. ``fit_context`` adds a hard budget (the positions the
model can take): a conversation over it either raises ``ContextTooLongError``
or loses its oldest turns, whole turns only, so an ``<img>`` span or a
``<ref>``/``<box>`` span is never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from .chat_format import make_context

Overflow = Literal["drop_oldest", "error"]


class ContextTooLongError(ValueError):
    """The conversation does not fit the token budget."""


def fit_context(
    tokenizer,
    query: str,
    history: Sequence[tuple[str, str | None]] | None,
    system: str,
    max_window_size: int,
    budget: int,
    overflow: Overflow = "drop_oldest",
    chat_format: str = "chatml",
) -> tuple[str, list[int], list[tuple[str, str | None]]]:
    """``(raw_text, tokens, kept_history)`` with ``len(tokens) <= budget``.

    ``overflow="drop_oldest"`` drops the oldest turns until the context fits;
    ``"error"`` raises ``ContextTooLongError`` naming the sizes. A query that does
    not fit even without history always raises.
    """
    if overflow not in ("drop_oldest", "error"):
        raise ValueError(f"overflow must be 'drop_oldest' or 'error', got {overflow!r}")
    kept = [tuple(turn) for turn in (history or [])]
    while True:
        raw_text, tokens = make_context(tokenizer, query, kept, system, max_window_size, chat_format)
        if len(tokens) <= budget:
            return raw_text, tokens, kept
        if not kept:
            raise ContextTooLongError(
                f"the query and system prompt take {len(tokens)} tokens, over the budget of {budget}"
            )
        if overflow == "error":
            raise ContextTooLongError(
                f"the conversation takes {len(tokens)} tokens, over the budget of {budget} "
                f"({len(kept)} earlier turns); shorten it or use overflow='drop_oldest'"
            )
        kept = kept[1:]
