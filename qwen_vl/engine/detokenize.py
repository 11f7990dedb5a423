"""Turning a stream of token ids into a stream of text without splitting characters.

Byte-level tokens may end inside a multi-byte UTF-8 character; decoding with
``errors="replace"`` then ends the text with one U+FFFD. That last character is
held back until a later token completes it. Only a small window of recent
tokens is decoded at each step, so the cost per token does not grow with the
length of the sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["IncrementalDetokenizer", "REPLACEMENT"]

REPLACEMENT = "\ufffd"
#: A trailing U+FFFD not completed by this many further tokens is emitted as it is.
MAX_HELD_TOKENS = 4
#: Tokens since the last whole-character token boundary after which the window is cut anyway.
MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    """Decode token ids one at a time: ``push`` returns the newly completed text, ``finish`` the rest.

    ``decode_fn`` decodes a list of ids with errors replaced; ids in
    ``skip_ids`` are dropped. For output that is valid UTF-8 the increments
    never contain a partial character and, joined with ``finish()``, equal
    ``decode_fn(all ids)``.

    Only the window ``_ids`` (from the prefix offset) is decoded: ``_ids[:_read]``
    is context ending on a whole character (the read offset), and the window's
    text has been returned up to character ``_emitted``.
    """

    def __init__(self, decode_fn: Callable[[list[int]], str], skip_ids: Iterable[int] | None = None):
        self.decode_fn = decode_fn
        self.skip_ids = frozenset(skip_ids or ())
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        self._read = 0  # read offset, relative to the window
        self._prefix_len = 0  # characters of decode(_ids[:_read])
        self._emitted = 0  # characters of decode(_ids) already returned
        self._holding = False  # the last character of the window's text is held back
        self._held_for = 0  # further tokens that did not complete the held character

    def _advance(self, text_len: int) -> None:
        """The window ends on a whole character: drop the old context, keep the newest chunk as context."""
        shift = self._prefix_len
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_len = text_len - shift
        self._emitted -= shift

    def _cut(self, text: str) -> bool:
        """Restart the window (text ``text``) at a later token, which may begin inside a character.

        A window starting inside a character decodes its first bytes to
        stand-in U+FFFDs for text already returned; the rest must match the
        end of ``text`` from a whole character on. Tries the latest start
        first; returns False when no start lines up (the bytes are invalid).
        """
        for start in range(len(self._ids) - 2, self._read, -1):
            sub = self.decode_fn(self._ids[start:])
            offset = len(text) - len(sub)  # position in ``text`` of sub[0]
            k = 0  # stand-ins at the front of ``sub``
            while k < len(sub) and sub[k] == REPLACEMENT:
                k += 1
            if offset >= 0 and k < len(sub) and sub[k:] == text[offset + k :] and offset + k <= self._emitted:
                self._ids = self._ids[start:]
                self._read = self._prefix_len = 0
                self._emitted -= offset
                return True
        return False

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        if token_id in self.skip_ids:
            return ""
        self._ids.append(int(token_id))
        text = self.decode_fn(self._ids)
        partial = text.endswith(REPLACEMENT)
        if partial and self._holding and self._held_for >= MAX_HELD_TOKENS:
            partial = False  # not completed by several further tokens: the bytes are invalid
        end = len(text) - 1 if partial else len(text)
        out = text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        if partial and len(self._ids) - self._read > MAX_PENDING_TOKENS and not self._cut(text):
            out += text[self._emitted :]  # no whole character to restart from: invalid bytes
            self._emitted, partial = len(text), False
        self._held_for = self._held_for + 1 if partial and not out and self._holding else 0
        self._holding = partial
        if not partial:
            self._advance(len(text))
        return out

    def finish(self) -> str:
        """Return the text still held back and start over."""
        out = self.decode_fn(self._ids)[self._emitted :] if self._ids else ""
        self._reset()
        return out
