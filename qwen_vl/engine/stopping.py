"""Stopping on stop words: token sequences (during decoding) and strings (while streaming text).

Token-level stop words follow the reference ``StopWordsLogitsProcessor``: once
a row's ids end with a stop sequence, its end-of-sequence score is raised to
``2**15`` so that the next token is end-of-sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

__all__ = ["STOP_SCORE", "stop_word_hits", "force_eos_after_stop_words", "StopStringMatcher"]

#: The score given to end-of-sequence after a stop word.
STOP_SCORE = float(2**15)


@functools.lru_cache(maxsize=64)
def _grouped(stop_words: tuple[tuple[int, ...], ...], device: torch.device) -> list[torch.Tensor]:
    """Stop sequences stacked by length: a list of (S_L, L) long tensors."""
    by_len: dict[int, list[tuple[int, ...]]] = {}
    for seq in stop_words:
        by_len.setdefault(len(seq), []).append(seq)
    return [torch.tensor(seqs, dtype=torch.long, device=device) for _, seqs in sorted(by_len.items())]


def _normalise(stop_words_ids: Sequence[Sequence[int]], eos_token_id: int | None) -> tuple[tuple[int, ...], ...]:
    out = []
    for seq in stop_words_ids:
        seq = tuple(int(t) for t in seq)
        if not seq:
            raise ValueError("stop_words_ids must not contain an empty sequence")
        if eos_token_id is not None and seq == (eos_token_id,):
            continue  # end-of-sequence alone already stops; the reference drops it too
        out.append(seq)
    return tuple(dict.fromkeys(out))


def stop_word_hits(
    ids: torch.Tensor,
    valid: torch.Tensor | None,
    stop_words_ids: Sequence[Sequence[int]],
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Which rows end with a stop sequence: (B,) bool.

    ids (B, T) long, each row's last token in column T - 1 (rows shorter than
    T are left-padded). ``valid`` tells the real tokens apart from padding:
    either a (B, T) bool mask (True = real token) or (B,) long lengths (the
    last ``length`` columns are real); None means every column is real. A stop
    sequence matches only if all its tokens are real, so it never spans
    padding and never matches a row shorter than itself. A sequence equal to
    ``[eos_token_id]`` is ignored.
    """
    B, T = ids.shape
    hits = torch.zeros(B, dtype=torch.bool, device=ids.device)
    seqs = _normalise(stop_words_ids, eos_token_id)
    if not seqs:
        return hits
    for group in _grouped(seqs, ids.device):  # (S, L)
        L = group.shape[1]
        if L > T:
            break  # groups are sorted by length
        tail = ids[:, T - L :]  # (B, L)
        match = (tail[:, None, :] == group[None]).all(-1).any(-1)  # (B,)
        if valid is not None:
            if valid.dim() == 2:
                match &= valid[:, T - L :].all(-1)
            else:
                match &= valid >= L
        hits |= match
    return hits


def force_eos_after_stop_words(
    scores: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor | None,
    stop_words_ids: Sequence[Sequence[int]],
    eos_token_id: int,
) -> torch.Tensor:
    """Set ``scores[row, eos_token_id] = 2**15`` in place for rows ending with a stop sequence.

    scores (B, V); ids and valid as in :func:`stop_word_hits`. Returns ``scores``.
    """
    hits = stop_word_hits(ids, valid, stop_words_ids, eos_token_id)  # (B,)
    scores[:, eos_token_id].masked_fill_(hits, STOP_SCORE)  # in place through the (B,) view
    return scores


class StopStringMatcher:
    """Cut a stream of text at the first stop string.

    :meth:`feed` returns the text that is safe to show now: a suffix that could
    still grow into a stop string is held back until it is decided. The stream
    stops where a stop string is first completed (the earliest end; among stop
    strings ending there, the one starting first), whatever the chunking.
    """

    def __init__(self, stop_strings: Sequence[str]):
        strings = list(dict.fromkeys(stop_strings))
        if any(not s for s in strings):
            raise ValueError("stop strings must not be empty")
        self.stop_strings = strings
        self._prefixes = {s[:i] for s in strings for i in range(1, len(s))}
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string found, once stopped

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Add ``new_text``; return (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        text = self._held + new_text
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self.stop_strings:
            start = text.find(s)
            if start >= 0:
                cand = (start + len(s), start, s)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is not None:
            self.stopped, self.matched, self._held = True, best[2], ""
            return text[: best[1]], True
        keep = 0
        for n in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-n:] in self._prefixes:
                keep = n
                break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text at the end of the stream ("" once stopped)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out
