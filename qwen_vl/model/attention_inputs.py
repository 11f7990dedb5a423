"""Per-forward attention inputs shared by every layer: rotary tables, log-n factors,
the attention mask, and the key/value cache the layers write into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import QWenConfig
from .rotary import logn_scale, ntk_alpha_for_length, rotary_cos_sin

if TYPE_CHECKING:
    from ..engine.kv_cache import KVCache, KVCacheRows


@dataclass
class AttentionInputs:
    cos: torch.Tensor  # (B, T, 1, rot_dim) float32
    sin: torch.Tensor  # (B, T, 1, rot_dim) float32
    logn: torch.Tensor | None  # (B, T) float64, None when no position needs it
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend
    is_causal: bool
    kv_cache: KVCacheRows | None


def build_attention_inputs(
    config: QWenConfig,
    token_mask: torch.Tensor | None,
    input_shape: tuple[int, int],
    device: torch.device,
    kv_cache: KVCache | KVCacheRows | None,
    training: bool,
) -> AttentionInputs:
    """Positions, NTK factors and masks for new tokens (B, T).

    ``token_mask`` (B, T) marks real tokens (False = padding, anywhere in the row);
    None means every token is real. Positions count real tokens only, so a padded
    row computes exactly what it would compute alone. With a cache, each row
    continues from its own length.
    """
    from ..engine.kv_cache import KVCache

    B, T = input_shape
    if isinstance(kv_cache, KVCache):
        kv_cache = kv_cache.rows(0, kv_cache.batch_size)
    pasts = kv_cache.past_lengths if kv_cache is not None else [0] * B
    padded = token_mask is not None and not bool(token_mask.all())
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    token_mask = token_mask.bool()
    start = kv_cache.row_positions if kv_cache is not None else torch.zeros(B, dtype=torch.long, device=device)
    positions = (start[:, None] + token_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    stored = kv_cache.row_alphas if kv_cache is not None else [1.0] * B
    if config.use_dynamic_ntk and not training and any(p == 0 for p in pasts):
        lengths = token_mask.sum(-1).tolist() if padded else [T] * B
        fresh = [ntk_alpha_for_length(max(n, 1), config.seq_length) for n in lengths]
        alphas = [fresh[i] if pasts[i] == 0 else stored[i] for i in range(B)]
    else:
        alphas = stored
    cos, sin = rotary_cos_sin(positions, alphas, config.rotary_emb_base, config.rotary_dim)

    max_past = max(pasts)
    logn = None
    if config.use_logn_attn and not training and max_past + T > config.seq_length:
        logn = logn_scale(positions, config.seq_length)

    if kv_cache is not None:
        key_valid = kv_cache.record(token_mask, positions, alphas, padded)  # (B, S)
        any_padding = kv_cache.has_padding
    else:
        key_valid = token_mask
        any_padding = padded

    mask, is_causal = None, False
    same_length = min(pasts) == max_past
    if not any_padding and same_length and max_past == 0:
        is_causal = T > 1
    elif any_padding or T > 1 or not same_length:
        S = max_past + T
        key_idx = torch.arange(S, device=device)  # (S,)
        past_t = torch.tensor(pasts, device=device)  # (B,)
        query_idx = past_t[:, None] + torch.arange(T, device=device)[None, :]  # (B, T)
        causal = key_idx[None, None, :] <= query_idx[:, :, None]  # (B, T, S)
        own = key_idx[None, None, :] == query_idx[:, :, None]  # (B, T, S)
        mask = ((key_valid[:, None, :] & causal) | own)[:, None]  # (B, 1, T, S)
    return AttentionInputs(cos=cos, sin=sin, logn=logn, mask=mask, is_causal=is_causal, kv_cache=kv_cache)
