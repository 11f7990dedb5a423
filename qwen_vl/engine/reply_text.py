"""Reading a reply's ids back as text: the ids that have text, and streamed text held back
so that a final token the reply drops is never shown and the pieces join into the answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..chat_format import decode_tokens

TextSink = Callable[[str], Any]


def readable_ids(ids: list[int], vocab: int, keep_last: bool) -> list[int]:
    """``ids`` without the ids the tokenizer has no text for (the model's padding rows, which
    only untrained weights pick). A chat reply drops or cuts before its last id, so that
    one is kept as it is and the count of ids stays what the official reading expects."""
    body, last = (ids[:-1], ids[-1:]) if keep_last else (ids, [])
    return [i for i in body if i < vocab] + last


def read_reply(tokenizer, raw_text: str, prompt_ids: list[int], new_ids: list[int], chat: bool) -> str:
    """The reply that ``new_ids`` make after ``prompt_ids`` (built as ``raw_text``), read as
    ``chat()`` reads it (``chat``) or as a raw continuation."""
    tokens = list(prompt_ids) + readable_ids(new_ids, len(tokenizer), keep_last=chat)
    chat_format = "chatml" if chat else "raw"
    return decode_tokens(tokens, tokenizer, len(raw_text), len(prompt_ids), chat_format, errors="replace")


class HeldBackText:
    """Passes streamed text on so that its pieces join into exactly the final answer.

    Each piece is held back one event, so a final token the reply drops is never shown;
    leading whitespace is never shown and trailing whitespace is held back until text
    other than whitespace follows, since the final answer is stripped. ``finish(final)``
    then shows the rest of ``final``. Should ``final`` not begin with what was already
    shown (the incremental text and the final reading disagree, which cannot be taken
    back), ``finish`` shows nothing more: the stream stays what it showed, never a
    second copy of the answer.
    """

    def __init__(self, sink: TextSink | None) -> None:
        self.sink = sink
        self.shown = ""
        self.streamed = ""
        self.last = ""

    def feed(self, text: str) -> None:
        """Take the next piece of streamed text; the one before it may now be shown."""
        self.streamed += self.last
        self.last = text
        self._show(self.streamed.strip())

    def finish(self, final: str) -> None:
        """Show what ``final``, the answer as read at the end, adds to what was shown."""
        if final.startswith(self.shown):
            self._show(final)

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self._emit(text[len(self.shown) :])
            self.shown = text

    def _emit(self, text: str) -> None:
        if self.sink is not None and text:
            self.sink(text)
