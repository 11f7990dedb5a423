"""Keys and values of finished conversations, kept for the next turn.

A chat's next turn repeats the previous context and answer, then adds the new
question. When a new prompt starts with the tokens of a stored sequence, the
engine copies the stored keys/values into the new row and prefills only the rest.
Reuse is exact: it is refused when the new prompt's dynamic-NTK factor differs
from the stored one (the rotary tables would differ) or when the shared prefix
would end inside an image span.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..model.image_spans import ImageSpan
from .kv_cache import KVCache


@dataclass
class StoredPrefix:
    ids: list[int]
    keys: torch.Tensor  # (layers, H, n, D)
    values: torch.Tensor  # (layers, H, n, D)
    ntk_alpha: float


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixStore:
    """Least-recently-used store of at most ``capacity`` finished sequences."""

    def __init__(self, capacity: int = 4, min_tokens: int = 16) -> None:
        self.capacity = capacity
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, StoredPrefix] = OrderedDict()
        self._next = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def save(self, cache: KVCache, row: int, ids: list[int]) -> None:
        """Keep the first ``cache.lengths[row]`` slots of ``row`` (which hold ``ids``)."""
        n = cache.lengths[row]
        if self.capacity < 1 or n < self.min_tokens or cache.padded[row]:
            return
        entry = StoredPrefix(
            ids=list(ids[:n]),
            keys=cache.keys[:, row, :, :n].clone(),
            values=cache.values[:, row, :, :n].clone(),
            ntk_alpha=cache.ntk_alphas[row],
        )
        self._entries[self._next] = entry
        self._next += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def match(self, prompt: list[int], spans: list[ImageSpan], ntk_alpha: float) -> tuple[StoredPrefix, int] | None:
        """The stored entry sharing the longest usable prefix with ``prompt``, and its length."""
        best: tuple[int, StoredPrefix, int] | None = None
        for key, entry in self._entries.items():
            if entry.ntk_alpha != ntk_alpha:
                continue
            p = min(common_prefix(entry.ids, prompt), len(prompt) - 1)  # keep a token to prefill
            for span in spans:
                if span.start < p <= span.end:
                    p = span.start  # never split an image span
            if p >= self.min_tokens and (best is None or p > best[2]):
                best = (key, entry, p)
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        return best[1], best[2]

    def restore(self, cache: KVCache, row: int, entry: StoredPrefix, length: int) -> None:
        """Fill ``row`` with the first ``length`` stored slots."""
        cache.reset_row(row)
        cache.keys[:, row, :, :length] = entry.keys[:, :, :length]
        cache.values[:, row, :, :length] = entry.values[:, :, :length]
        cache.valid[row, :length] = True
        cache.next_position[row] = length
        cache.lengths[row] = length
        cache.ntk_alphas[row] = entry.ntk_alpha
        self.reused_tokens += length
