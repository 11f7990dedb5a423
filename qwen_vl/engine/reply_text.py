"""Reading a reply's ids back as text: the ids that have text, and streamed text held back
one event so that a final token the reply drops is never shown."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TextSink = Callable[[str], Any]


def readable_ids(ids: list[int], vocab: int, keep_last: bool) -> list[int]:
    """``ids`` without the ids the tokenizer has no text for (the model's padding rows, which
    only untrained weights pick). A chat reply drops or cuts before its last id, so that
    one is kept as it is and the count of ids stays what the official reading expects."""
    body, last = (ids[:-1], ids[-1:]) if keep_last else (ids, [])
    return [i for i in body if i < vocab] + last


class HeldBackText:
    """Passes streamed text on one event late, so that a final token the reply drops is never shown."""

    def __init__(self, sink: TextSink | None) -> None:
        self.sink = sink
        self.shown = ""
        self.streamed = ""
        self.last = ""

    def feed(self, text: str) -> None:
        self.streamed += self.last
        self.last = text
        self._show(self.streamed.lstrip())

    def finish(self, final: str) -> None:
        if final.startswith(self.shown):
            self._show(final)
        elif not self.shown.startswith(final):
            self._emit("\n" + final)
            self.shown = final

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self._emit(text[len(self.shown) :])
            self.shown = text

    def _emit(self, text: str) -> None:
        if self.sink is not None and text:
            self.sink(text)
