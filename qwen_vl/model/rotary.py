"""Rotary position embedding with dynamic NTK scaling, and log-n query scaling.

Dynamic NTK: at prefill a prompt of L tokens picks
``alpha = max(2**ceil(log2(L / seq_length) + 1) - 1, 1)`` and rotates with base
``base * alpha ** (d / (d - 2))``; later decoding steps keep that alpha. Log-n:
the query at 0-based position p is multiplied by ``log(p + 1) / log(seq_length)``
once ``p + 1 > seq_length``.
"""

from __future__ import annotations

import math

import torch


def ntk_alpha_for_length(length: int, seq_length: int) -> float:
    """Dynamic-NTK factor chosen at prefill for a prompt of ``length`` tokens."""
    context_value = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def rotary_inv_freq(base: float, alpha: float, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (dim // 2,) float32 for an NTK-scaled ``base``."""
    scaled_base = base * alpha ** (dim / (dim - 2))
    return 1.0 / (scaled_base ** (torch.arange(0, dim, 2, device=device).float() / dim))


def rotary_cos_sin(
    positions: torch.Tensor, alphas: list[float], base: float, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables for ``positions`` (B, T), one NTK factor per row.

    Returns two float32 tensors (B, T, 1, dim) laid out as cat(freqs, freqs).
    """
    device = positions.device
    distinct = sorted(set(alphas))
    if len(distinct) == 1:
        inv_freq = rotary_inv_freq(base, distinct[0], dim, device)[None, :]  # (1, dim/2)
    else:
        table = {a: rotary_inv_freq(base, a, dim, device) for a in distinct}
        inv_freq = torch.stack([table[a] for a in alphas])  # (B, dim/2)
    return cos_sin_from_inv_freq(positions, inv_freq)


def cos_sin_from_inv_freq(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin (B, T, 1, dim) float32 for ``positions`` (B, T) and per-row ``inv_freq`` (B or 1, dim/2)."""
    freqs = positions.float()[:, :, None] * inv_freq[:, None, :]  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, dim)
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of t (B, T, H, D) in float32."""
    rot_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rot_dim].float(), t[..., rot_dim:].float()
    half = rot_dim // 2
    rotated_half = torch.cat((-t_rot[..., half:], t_rot[..., :half]), dim=-1)
    t_rot = t_rot * cos + rotated_half * sin
    return torch.cat((t_rot, t_pass), dim=-1).type_as(t)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Log-n query factor (B, T) float64: log(p+1)/log(seq_length) past seq_length, else 1."""
    n = (positions + 1).double()
    scaled = torch.log(n) / math.log(seq_length)
    return torch.where(n > seq_length, scaled, torch.ones_like(scaled))
