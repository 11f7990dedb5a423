"""Preallocated key/value cache: one buffer per layer, written in place.

The cache never grows with ``torch.cat``: it reserves ``max_length`` slots per row
up front and each forward writes its new keys and values into the next free slots
of each row. Rows keep their own lengths, so requests of different lengths (and
requests that joined at different times) share one buffer; a per-slot validity
mask lets padded rows attend only to their own tokens.

``rows(start, stop)`` gives a view over a contiguous range of rows that writes
into the same buffers: prefilling one new request into a free row, or decoding
only the active rows, needs no copy.
"""

from __future__ import annotations

import torch


class KVCache:
    """Static cache of shape (layers, B, H, max_length, D) for keys and values."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)  # (B, S)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.max_length = max_length
        self.lengths = [0] * batch_size  # slots written per row (host side: no device sync)
        self.ntk_alphas = [1.0] * batch_size
        self.padded = [False] * batch_size  # row holds invalid (padding) slots

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def rows(self, start: int, stop: int) -> KVCacheRows:
        """A view of rows [start, stop) for one forward."""
        return KVCacheRows(self, start, stop)

    def reset_row(self, row: int) -> None:
        """Free ``row`` for a new sequence."""
        self.lengths[row] = 0
        self.ntk_alphas[row] = 1.0
        self.padded[row] = False
        self.valid[row] = False
        self.next_position[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` (its used slots) into row ``dst`` and free ``src``."""
        n = self.lengths[src]
        self.keys[:, dst, :, :n] = self.keys[:, src, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]
        self.valid[dst] = self.valid[src]
        self.next_position[dst] = self.next_position[src]
        self.lengths[dst], self.ntk_alphas[dst], self.padded[dst] = n, self.ntk_alphas[src], self.padded[src]
        self.reset_row(src)


class KVCacheRows:
    """Rows [start, stop) of a ``KVCache``, as seen by one forward."""

    def __init__(self, cache: KVCache, start: int, stop: int) -> None:
        if not 0 <= start < stop <= cache.batch_size:
            raise ValueError(f"rows {start}..{stop} outside a cache of {cache.batch_size} rows")
        self.cache = cache
        self.start, self.stop = start, stop
        self.pending = 0
        self._write_at: torch.Tensor | None = None

    @property
    def past_lengths(self) -> list[int]:
        return self.cache.lengths[self.start : self.stop]

    @property
    def has_padding(self) -> bool:
        return any(self.cache.padded[self.start : self.stop])

    @property
    def row_alphas(self) -> list[float]:
        return self.cache.ntk_alphas[self.start : self.stop]

    @property
    def row_positions(self) -> torch.Tensor:
        return self.cache.next_position[self.start : self.stop]

    def record(
        self, token_mask: torch.Tensor, positions: torch.Tensor, alphas: list[float], padded: bool
    ) -> torch.Tensor:
        """Register new tokens (B, T) before the layers run; returns key validity (B, S).

        ``alphas`` is stored for rows that were empty (their prefill factor).
        """
        c, rows = self.cache, slice(self.start, self.stop)
        T = token_mask.shape[1]
        past = self.past_lengths
        end = max(past) + T
        if end > c.max_length:
            raise ValueError(f"KV cache full: {end} tokens exceed its capacity of {c.max_length} per sequence")
        for i, n in enumerate(past):
            r = self.start + i
            if n == 0:
                c.ntk_alphas[r] = alphas[i]
            c.padded[r] = c.padded[r] or padded
        if len(set(past)) == 1:
            c.valid[rows, past[0] : past[0] + T] = token_mask
            self._write_at = None
        else:
            # Rows at different lengths: each writes at its own offset.
            offsets = torch.tensor(past, device=token_mask.device)[:, None] + torch.arange(T, device=token_mask.device)
            c.valid[rows].scatter_(1, offsets, token_mask)  # in place through the row view
            self._write_at = offsets  # (B, T)
        c.next_position[rows] = torch.where(token_mask.any(-1), positions[:, -1] + 1, c.next_position[rows])
        self.pending = T
        return c.valid[rows, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values (B, H, T, D); return all so far (B, H, S, D)."""
        c, rows = self.cache, slice(self.start, self.stop)
        past = self.past_lengths
        T = k.shape[2]
        end = max(past) + T
        keys, values = c.keys[layer, rows], c.values[layer, rows]  # views (B, H, S_max, D)
        if self._write_at is None:
            keys[:, :, past[0] : past[0] + T] = k
            values[:, :, past[0] : past[0] + T] = v
        else:
            index = self._write_at[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, H, T, D)
            keys.scatter_(2, index, k)
            values.scatter_(2, index, v)
        return keys[:, :, :end], values[:, :, :end]

    def commit(self) -> None:
        """Make the slots written by the last forward part of the cache."""
        for r in range(self.start, self.stop):
            self.cache.lengths[r] += self.pending
        self.pending = 0
