"""Preallocated key/value cache: one buffer per layer, written in place.

The cache never grows with ``torch.cat``: ``allocate`` reserves room for the
prompt plus every token that may be generated, and each forward writes its new
keys and values into the next slots. Rows of a batch share slot indices; a
per-slot validity mask lets rows of different lengths (padding anywhere) attend
only to their own tokens.
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
        self.length = 0  # slots written so far (same for every row)
        self.pending = 0  # slots being written by the forward in progress
        self.ntk_alphas: list[float] = [1.0] * batch_size
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def record(
        self, token_mask: torch.Tensor, positions: torch.Tensor, alphas: list[float], padded: bool
    ) -> torch.Tensor:
        """Register new tokens (B, T) before the layers run; returns key validity (B, S)."""
        T = token_mask.shape[1]
        end = self.length + T
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} tokens exceed its capacity of {self.max_length}")
        self.valid[:, self.length : end] = token_mask
        self.next_position = torch.where(token_mask.any(-1), positions[:, -1] + 1, self.next_position)
        if self.length == 0:
            self.ntk_alphas = list(alphas)
        self.has_padding = self.has_padding or padded
        self.pending = T
        return self.valid[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values (B, H, T, D); return all so far (B, H, S, D)."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def commit(self) -> None:
        """Make the slots written by the last forward part of the cache."""
        self.length += self.pending
        self.pending = 0
