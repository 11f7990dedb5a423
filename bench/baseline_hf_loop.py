"""The reference the engine is measured against: an HF-style eager generation loop.

It is what the official remote code does at inference, written with the model's
own modules (so both run the same weights):

* the batch is padded on the left to its longest prompt and every row runs until
  the longest request is done;
* the prefill computes logits for every prompt position, as the official
  ``lm_head`` call does;
* each layer keeps its keys and values in tensors that grow by ``torch.cat``
  every step;
* attention is the eager ``softmax(q k^T / sqrt(d) + mask) v``;
* the next token of each row is picked in a Python loop over rows
  (``torch.softmax`` then argmax: greedy).

Positions count real tokens only and the rotary NTK factor is chosen once from
the padded prompt length; sequences must stay within ``config.seq_length`` (no
log-n scaling, as with short sequences in the official code).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwen_vl.images import image_transform
from qwen_vl.model.image_spans import find_image_spans
from qwen_vl.model.rotary import apply_rotary, ntk_alpha_for_length, rotary_cos_sin

PAD_ID = 0


@dataclass
class BaselineOutput:
    """Generated ids per row and when the first token and the last one were ready."""

    tokens: list[list[int]]
    first_token_s: float
    total_s: float


def _embed(model, ids: torch.Tensor, images: Sequence[Any] | None) -> torch.Tensor:
    """Token embeddings (B, T, C) with image features written into the ``<img>`` spans."""
    h = model.transformer.wte(ids)
    cfg = model.config
    spans = find_image_spans(ids, cfg.image_start_id, cfg.num_image_queries)
    if not spans:
        return h
    if images is None or len(images) != len(spans):
        raise ValueError(f"{len(spans)} image spans need as many images")
    size = int(cfg.visual["image_size"])
    visual = model.transformer.visual
    weight = next(visual.parameters())
    pixels = torch.stack([image_transform(img, size) for img in images]).to(weight.device, weight.dtype)
    features = visual(pixels).to(h.dtype)  # (N, 256, C)
    for feature, span in zip(features, spans):
        h[span.row, span.start + 1 : span.end] = feature
    return h


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v for (B, H, T, D) x (B, H, S, D); ``allowed`` (B, 1, T, S)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def _forward(
    model,
    h: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor,
    past: list[tuple[torch.Tensor, torch.Tensor] | None],
    alpha: float,
) -> torch.Tensor:
    """Run the decoder stack over new hidden states h (B, T, C); grows ``past`` in place."""
    cfg = model.config
    B, T, _ = h.shape
    H, D = cfg.num_attention_heads, cfg.head_dim
    cos, sin = rotary_cos_sin(positions, [alpha] * B, cfg.rotary_emb_base, cfg.rotary_dim)
    S = key_mask.shape[1]
    query_at = torch.arange(S - T, S, device=h.device)[:, None]  # (T, 1) slots of the new tokens
    causal = torch.arange(S, device=h.device)[None, :] <= query_at  # (T, S)
    allowed = (causal[None] & key_mask[:, None, :])[:, None]  # (B, 1, T, S)
    for i, block in enumerate(model.transformer.h):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(h)).split(H * D, dim=-1)
        q = apply_rotary(q.view(B, T, H, D), cos, sin).transpose(1, 2)
        k = apply_rotary(k.view(B, T, H, D), cos, sin).transpose(1, 2)
        v = v.view(B, T, H, D).transpose(1, 2)
        if past[i] is not None:
            k = torch.cat([past[i][0], k], dim=2)
            v = torch.cat([past[i][1], v], dim=2)
        past[i] = (k, v)
        y = _eager_attention(q, k, v, allowed).transpose(1, 2).reshape(B, T, H * D)
        h = h + attn.c_proj(y)
        h = h + block.mlp(block.ln_2(h))
    return model.transformer.ln_f(h)


def _pick_tokens(logits: torch.Tensor) -> list[int]:
    """Greedy choice row by row, as a per-row Python sampling loop does."""
    chosen = []
    for row in range(logits.shape[0]):
        probs = torch.softmax(logits[row].float(), dim=-1)
        chosen.append(int(torch.argmax(probs)))
    return chosen


@torch.no_grad()
def baseline_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, images: Sequence[Any] | None = None
) -> BaselineOutput:
    """Greedy ``max_new_tokens`` for every prompt, padded together into one batch.

    ``images`` (PIL images) fill the prompts' ``<img>`` spans in order.
    """
    start = time.perf_counter()
    B, T = len(prompts), max(len(p) for p in prompts)
    if T + max_new_tokens > model.config.seq_length:
        raise ValueError(f"{T} + {max_new_tokens} tokens exceed seq_length {model.config.seq_length}")
    device = model.lm_head.weight.device
    ids = torch.full((B, T), PAD_ID, dtype=torch.long)
    key_mask = torch.zeros(B, T, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt) :] = torch.tensor(list(prompt))
        key_mask[row, T - len(prompt) :] = True
    ids, key_mask = ids.to(device), key_mask.to(device)
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    alpha = ntk_alpha_for_length(T, model.config.seq_length)
    past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.transformer.h)

    h = _forward(model, _embed(model, ids, images), positions, key_mask, past, alpha)
    logits = model.lm_head(h)  # (B, T, V): every position, as the official forward returns
    tokens: list[list[int]] = [[t] for t in _pick_tokens(logits[:, -1])]
    first_token_s = time.perf_counter() - start
    next_position = positions[:, -1] + 1
    for _ in range(max_new_tokens - 1):
        last = torch.tensor([[row[-1]] for row in tokens], device=device)
        key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        h = _forward(model, model.transformer.wte(last), next_position[:, None], key_mask, past, alpha)
        logits = model.lm_head(h)
        for row, token in zip(tokens, _pick_tokens(logits[:, -1])):
            row.append(token)
        next_position = next_position + 1
    return BaselineOutput(tokens, first_token_s, time.perf_counter() - start)
