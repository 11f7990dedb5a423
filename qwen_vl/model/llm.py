"""The Qwen language-model blocks: RMSNorm, attention over a key/value cache, and
the gated MLP.

Module and parameter names equal the official checkpoint keys under
``transformer.h.{i}``: ``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``,
``mlp.w1``, ``mlp.w2``, ``mlp.c_proj``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QWenConfig
from .attention_inputs import AttentionInputs
from .rotary import apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, then cast back and scaled."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class QWenAttention(nn.Module):
    """Causal self-attention with fused qkv projection (``c_attn``) and ``c_proj``."""

    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale_attn_weights = config.scale_attn_weights
        proj = config.projection_size
        self.c_attn = nn.Linear(config.hidden_size, 3 * proj, bias=True)
        self.c_proj = nn.Linear(proj, config.hidden_size, bias=not config.no_bias)
        self.attn_dropout_prob = config.attn_dropout_prob

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.num_heads, self.head_dim)
        v = v.view(B, T, self.num_heads, self.head_dim)
        q = apply_rotary(q, inputs.cos, inputs.sin)
        k = apply_rotary(k, inputs.cos, inputs.sin)
        if inputs.logn is not None:
            q = q * inputs.logn.to(q.dtype)[:, :, None, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if inputs.kv_cache is not None:
            k, v = inputs.kv_cache.update(self.layer_idx, k, v)  # (B, H, S, D)
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        dropout = self.attn_dropout_prob if self.training else 0.0
        y = attention(q, k, v, inputs.mask, inputs.is_causal, scale, dropout)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, C)
        return self.c_proj(y)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention, (B, H, T, D) x (B, H, S, D) -> (B, H, T, D).

    The fused kernels scale q before the product and accumulate q·k and the
    softmax in float32 even for float16 inputs, so long float16 prompts do not
    overflow to inf/NaN as a float16 ``q @ k.T`` does.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout)


class QWenMLP(nn.Module):
    """Gated MLP: ``c_proj(w1(x) * silu(w2(x)))``."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        ff = config.ffn_hidden_size
        self.w1 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    """Pre-norm decoder block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), inputs)
        out = h + self.mlp(self.ln_2(h))
        if out.dtype == torch.float16:
            out = clamp_to_half_range(out)
        return out


def clamp_to_half_range(x: torch.Tensor) -> torch.Tensor:
    """Keep a float16 residual stream finite: overflowed values saturate instead of
    becoming inf (and NaN one layer later)."""
    limit = torch.finfo(torch.float16).max - 1000
    return torch.nan_to_num(x, nan=0.0, posinf=limit, neginf=-limit).clamp(-limit, limit)
