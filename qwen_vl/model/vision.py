"""The Qwen-VL vision tower: a ViT over image patches followed by a cross-attention
``Resampler`` that pools the patch grid into a fixed number of query features.

Module and parameter names equal the official state-dict keys below
``transformer.visual.``, so checkpoints load unchanged. ``init_weights`` holds all
random initialisation; ``__init__`` calls it only for real (non-meta) tensors, so
building on the meta device before loading a checkpoint does no work.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_NORM_EPS = 1e-6


def interpolate_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a square grid of position embeddings (G*G, C) to ``num_tokens`` = g*g.

    Bicubic with ``align_corners=False``, computed in float32 and cast back; the
    input is returned as is when the grid already has the wanted size.
    """
    src = int(math.isqrt(pos.shape[0]))
    dst = int(math.isqrt(num_tokens))
    if src == dst:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(dst * dst, -1).to(pos.dtype)  # (g*g, C)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding (grid_size**2, dim), row-major over (y, x).

    The first half of the channels encodes the column (x), the second half the
    row (y); each half is [sin(p * w), cos(p * w)] with w = 10000**(-i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega  # (G*G, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (G*G, dim/2)

    return torch.cat([encode(xs), encode(ys)], dim=1).float()  # (G*G, dim)


class VisualAttention(nn.Module):
    """Self-attention whose fused ``in_proj`` output is laid out per head as
    [q, k, v] (heads x 3 x head_dim)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.in_proj(x).view(B, L, self.heads, 3, self.head_dim)  # (B, L, H, 3, D)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # 3 x (B, H, L, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class VisualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    """The stack of ``resblocks``."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return x


class PoolAttention(nn.Module):
    """Multi-head cross-attention with the parameter layout of
    ``nn.MultiheadAttention`` (fused ``in_proj_weight`` rows: q, k, v)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Resampler dim {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def split(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            y = F.linear(x, w, b)  # (B, L, dim)
            return y.view(y.shape[0], y.shape[1], self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

        q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, D)
        B, _, Q, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, Q, -1))  # (B, Q, dim)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.trunc_normal_(self.out_proj.weight, std=0.02)
        nn.init.zeros_(self.out_proj.bias)


class Resampler(nn.Module):
    """Pools patch features (B, L, kv_dim) into ``grid_size**2`` learned queries (B, Q, dim).

    Keys carry the 2-D position embedding resized to the patch grid; the queries
    carry it at its own ``grid_size`` resolution.
    """

    def __init__(self, grid_size: int, dim: int, heads: int, kv_dim: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        queries = grid_size * grid_size
        self.pos_embed = nn.Parameter(torch.empty(queries, dim), requires_grad=False)
        self.query = nn.Parameter(torch.empty(queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = PoolAttention(dim, heads)
        self.ln_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))  # (B, L, dim)
        key_pos = interpolate_pos_embed(self.pos_embed, x.shape[1])  # (L, dim)
        query = self.ln_q(self.query) + self.pos_embed  # (Q, dim)
        query = query.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, dim)
        return self.attn(query, kv + key_pos, kv)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[1], self.grid_size))
        nn.init.trunc_normal_(self.query, std=0.02)
        if isinstance(self.kv_proj, nn.Linear):
            nn.init.trunc_normal_(self.kv_proj.weight, std=0.02)
        self.attn.reset_parameters()
        for norm in (self.ln_q, self.ln_kv):
            norm.reset_parameters()


class VisionTransformer(nn.Module):
    """``transformer.visual``: pixels (N, 3, S, S) → features (N, n_queries, output_dim).

    Takes the official ``config.json["visual"]`` dict as keyword arguments.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        output_dim: int,
        image_start_id: int = 151857,
        n_queries: int = 256,
        **unused: Any,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if output_dim % 128:
            raise ValueError(f"output_dim {output_dim} must be a multiple of 128 (Resampler head size)")
        grid = math.isqrt(n_queries)
        if grid * grid != n_queries:
            raise ValueError(f"n_queries {n_queries} is not a square number")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.output_dim = output_dim
        self.image_start_id = image_start_id
        self.n_queries = n_queries

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio)
        self.attn_pool = Resampler(grid, output_dim, output_dim // 128, kv_dim=width)
        self.ln_post = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.empty(output_dim, output_dim))
        #: When True and training, the resblocks run under activation checkpointing.
        self.gradient_checkpointing = False
        if not self.proj.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation in the style of the reference: PyTorch defaults for
        the patch embedding and resblocks, scaled normals for the position embedding
        and output projection, truncated normals in the Resampler, sin-cos
        ``attn_pool.pos_embed``, LayerNorms at identity."""
        width = self.positional_embedding.shape[1]
        self.conv1.reset_parameters()
        nn.init.normal_(self.positional_embedding, std=width**-0.5)
        nn.init.normal_(self.proj, std=self.output_dim**-0.5)
        for module in self.transformer.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()
        for norm in (self.ln_pre, self.ln_post):
            norm.reset_parameters()
        self.attn_pool.init_weights()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels → (N, n_queries, output_dim), in the
        parameter dtype."""
        x = pixel_values.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x)  # (N, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, width)
        x = x + interpolate_pos_embed(self.positional_embedding, x.shape[1])
        x = self.ln_pre(x)
        x = self.transformer(x, use_checkpoint=self.gradient_checkpointing and self.training)  # (N, g*g, width)
        x = self.attn_pool(x)  # (N, n_queries, output_dim)
        x = self.ln_post(x)
        return x @ self.proj

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → features (N, n_queries, output_dim) via the reference preprocessing."""
        from ..images import image_transform

        pixels = torch.stack([image_transform(im, self.image_size) for im in images])  # (N, 3, S, S)
        return self(pixels)
