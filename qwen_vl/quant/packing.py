"""The AutoGPTQ 4-bit tensor layout: packing, unpacking and reference dequantisation.

For a linear layer with ``in`` inputs, ``out`` outputs and ``G`` groups:

* ``qweight`` int32 (in / 8, out): eight 4-bit codes packed along the input
  dimension. Code ``q[k, n]`` (input k, output n) sits in word ``k // 8`` of column
  ``n``, at bits ``4 * (k % 8)`` .. ``4 * (k % 8) + 3``: the first input of a word
  is in its lowest nibble.
* ``qzeros`` int32 (G, out / 8): the zero points packed along the output
  dimension the same way: zero ``z[g, n]`` sits in word ``n // 8`` of row ``g`` at
  bits ``4 * (n % 8)``.
* ``scales`` float16 (G, out); ``g_idx`` int32 (in,): the group of each input,
  ``k // group_size`` unless act-order reordered the columns.

The weight is ``W[n, k] = scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``.
In the "gptq" checkpoint format (AutoGPTQ's, the official files') the nibble
stored in ``qzeros`` is the zero point minus one, so dequantisation adds one back
(a symmetric 4-bit layer stores 7 for its zero point 8); zero points 1..16 are
representable and 0 is not. In "gptq_v2" the nibble is the zero point itself.
A packed word is a bit pattern: words whose top nibble is 8 or more read as
negative int32 values, and unpacking masks after an arithmetic shift, so the
sign never leaks into a code.
"""

from __future__ import annotations

import torch

BITS = 4
PER_WORD = 32 // BITS  # eight 4-bit values per int32
MAX_CODE = (1 << BITS) - 1
_SHIFTS = tuple(BITS * j for j in range(PER_WORD))


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor(_SHIFTS, dtype=torch.int32, device=device)


def _to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) → the int32 tensors with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_codes(values: torch.Tensor, what: str) -> torch.Tensor:
    if values.is_floating_point():
        raise TypeError(f"{what}: expected integer codes, got {values.dtype}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > MAX_CODE):
        raise ValueError(f"{what}: 4-bit codes must be in 0..{MAX_CODE}, got {int(values.min())}..{int(values.max())}")
    return values.to(torch.int64)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """Codes (R, C) in 0..15 → int32 (R / 8, C), eight rows per word (``qweight``)."""
    R, C = values.shape
    if R % PER_WORD:
        raise ValueError(f"cannot pack {R} rows: the packed dimension must be a multiple of {PER_WORD}")
    v = _check_codes(values, "pack_rows").view(R // PER_WORD, PER_WORD, C)  # (R/8, 8, C)
    words = (v << _shifts(v.device).to(torch.int64)[None, :, None]).sum(1)  # (R/8, C)
    return _to_int32_words(words)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 (R / 8, C) → codes (R, C) int32 in 0..15; inverse of ``pack_rows``."""
    W, C = packed.shape
    codes = (packed[:, None, :] >> _shifts(packed.device)[None, :, None]) & MAX_CODE  # (R/8, 8, C)
    return codes.reshape(W * PER_WORD, C)


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """Codes (R, C) in 0..15 → int32 (R, C / 8), eight columns per word (``qzeros``)."""
    R, C = values.shape
    if C % PER_WORD:
        raise ValueError(f"cannot pack {C} columns: the packed dimension must be a multiple of {PER_WORD}")
    v = _check_codes(values, "pack_columns").view(R, C // PER_WORD, PER_WORD)  # (R, C/8, 8)
    words = (v << _shifts(v.device).to(torch.int64)[None, None, :]).sum(2)  # (R, C/8)
    return _to_int32_words(words)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 (R, C / 8) → codes (R, C) int32 in 0..15; inverse of ``pack_columns``."""
    R, W = packed.shape
    codes = (packed[:, :, None] >> _shifts(packed.device)[None, None, :]) & MAX_CODE  # (R, C/8, 8)
    return codes.reshape(R, W * PER_WORD)


def encode_zeros(zeros: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """Zero points (G, out) → packed ``qzeros`` (G, out / 8) storing ``zero - zero_offset``."""
    stored = zeros.to(torch.int64) - zero_offset
    if stored.numel() and (int(stored.min()) < 0 or int(stored.max()) > MAX_CODE):
        low, high = zero_offset, MAX_CODE + zero_offset
        found = f"{int(zeros.min())}..{int(zeros.max())}"
        raise ValueError(f"zero points must be in {low}..{high} for this checkpoint format, got {found}")
    return pack_columns(stored)


def decode_zeros(qzeros: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """Packed ``qzeros`` (G, out / 8) → zero points (G, out) int32."""
    return unpack_columns(qzeros) + zero_offset


def default_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``g_idx`` without act-order: input k belongs to group ``k // group_size``."""
    return torch.div(torch.arange(in_features, dtype=torch.int32, device=device), group_size, rounding_mode="floor")


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    zero_offset: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight (out, in) in ``dtype``, computed exactly in float32 then rounded once."""
    return dequantize_transposed(qweight, qzeros, scales, g_idx, zero_offset, dtype).t()


def dequantize_transposed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    zero_offset: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The transposed weight (in, out) in ``dtype``: ``x @ result`` is the layer's matmul."""
    codes = unpack_rows(qweight)  # (in, out)
    zeros = decode_zeros(qzeros, zero_offset)  # (G, out)
    groups = g_idx.long()
    w = (codes - zeros[groups]).to(torch.float32) * scales[groups].to(torch.float32)  # (in, out)
    return w.to(dtype)
