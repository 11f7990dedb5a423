"""Per-forward attention inputs shared by every layer: rotary tables, log-n factors,
the attention mask, and the key/value cache the layers write into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import QWenConfig
from .rotary import logn_scale, ntk_alpha_for_length, rotary_cos_sin

if TYPE_CHECKING:
    from ..engine.kv_cache import KVCache


@dataclass
class AttentionInputs:
    cos: torch.Tensor  # (B, T, 1, rot_dim) float32
    sin: torch.Tensor  # (B, T, 1, rot_dim) float32
    logn: torch.Tensor | None  # (B, T) float64, None when no position needs it
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend
    is_causal: bool
    kv_cache: KVCache | None


def build_attention_inputs(
    config: QWenConfig,
    token_mask: torch.Tensor | None,
    input_shape: tuple[int, int],
    device: torch.device,
    kv_cache: KVCache | None,
    training: bool,
) -> AttentionInputs:
    """Positions, NTK factors and masks for new tokens (B, T).

    ``token_mask`` (B, T) marks real tokens (False = padding, anywhere in the row);
    None means every token is real. Positions count real tokens only, so a padded
    row computes exactly what it would compute alone.
    """
    B, T = input_shape
    past = kv_cache.length if kv_cache is not None else 0
    padded = token_mask is not None and not bool(token_mask.all())
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    token_mask = token_mask.bool()
    start = kv_cache.next_position if kv_cache is not None else torch.zeros(B, dtype=torch.long, device=device)
    positions = (start[:, None] + token_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    if kv_cache is not None and past > 0:
        alphas = kv_cache.ntk_alphas
    elif config.use_dynamic_ntk and not training:
        lengths = token_mask.sum(-1).tolist() if padded else [T] * B
        alphas = [ntk_alpha_for_length(max(n, 1), config.seq_length) for n in lengths]
    else:
        alphas = [1.0] * B
    cos, sin = rotary_cos_sin(positions, alphas, config.rotary_emb_base, config.rotary_dim)

    logn = None
    if config.use_logn_attn and not training and past + T > config.seq_length:
        logn = logn_scale(positions, config.seq_length)

    if kv_cache is not None:
        key_valid = kv_cache.record(token_mask, positions, alphas, padded)  # (B, S)
        any_padding = kv_cache.has_padding
    else:
        key_valid = token_mask
        any_padding = padded

    mask, is_causal = None, False
    if not any_padding and past == 0:
        is_causal = T > 1
    elif any_padding or T > 1:
        S = past + T
        key_idx = torch.arange(S, device=device)  # (S,)
        query_idx = past + torch.arange(T, device=device)  # (T,)
        causal = key_idx[None, :] <= query_idx[:, None]  # (T, S)
        mask = (key_valid[:, None, :] & causal[None]) | (key_idx[None, :] == query_idx[:, None])[None]
        mask = mask[:, None]  # (B, 1, T, S)
    return AttentionInputs(cos=cos, sin=sin, logn=logn, mask=mask, is_causal=is_causal, kv_cache=kv_cache)
