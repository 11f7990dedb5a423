"""The look loss: one attention layer is told where in the picture each answer token's facts are.

A language model trained from scratch learns slowly to find, among a picture's 256 positions,
the ones a question is about; until it does, answers about one of several objects stay at chance.
The data's ``regions`` (``finetune.regions``) say where to look, so the loss can ask for it
directly: at every position that predicts a covered answer token, the first ``heads`` heads of
layer ``layer`` should put their attention on the covered cells. Per position and head the loss
is ``-log`` of the attention mass on those cells; positions are weighted so that every answer
with regions counts once, and the result is the mean over such answers.

The layer's queries and keys are taken from its attention module's input by a forward hook,
within the ordinary forward pass (no second pass over the model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..model.rotary import apply_rotary
from .regions import LookTarget


class LookLoss:
    """Scores the attention of ``model.transformer.h[layer]``'s first ``heads`` heads against
    look targets; ``arm`` before a forward pass, ``take`` after it."""

    def __init__(self, model: nn.Module, layer: int, heads: int) -> None:
        blocks = model.transformer.h
        if not 0 <= layer < len(blocks):
            raise ValueError(f"--look-loss-layer must be within 0-{len(blocks) - 1} (the model's layers), got {layer}")
        self.attn = blocks[layer].attn
        if not 1 <= heads <= self.attn.num_heads:
            raise ValueError(f"--look-loss-heads must be within 1-{self.attn.num_heads}, got {heads}")
        self.heads = heads
        self._targets: Sequence[Sequence[LookTarget]] | None = None
        self._loss: torch.Tensor | None = None
        self._handle = self.attn.register_forward_hook(self._hook)

    def arm(self, targets: Sequence[Sequence[LookTarget]]) -> None:
        """Score the next forward pass against ``targets[row]`` for each batch row."""
        self._targets, self._loss = targets, None

    def take(self) -> torch.Tensor | None:
        """The loss of the armed pass (float32 scalar), or None when it had no targets."""
        loss, self._loss, self._targets = self._loss, None, None
        return loss

    def remove(self) -> None:
        """Detach the hook from the model."""
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._targets is None or self._loss is not None:  # not armed, or a checkpointed re-run
            return
        x, inputs = args[0], args[1]  # (B, T, C) normalised input, AttentionInputs
        self._loss = look_loss(module, x, inputs, self._targets, self.heads)


def look_loss(attn: nn.Module, x: torch.Tensor, inputs, targets: Sequence[Sequence[LookTarget]], heads: int):
    """Mean over answers of ``-log`` attention mass on the targets' keys (see the module docs)."""
    B, T, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, _ = attn.c_attn(x).split(H * D, dim=-1)
    q = apply_rotary(q.view(B, T, H, D)[:, :, :heads], inputs.cos, inputs.sin).float()  # (B, T, h, D)
    k = apply_rotary(k.view(B, T, H, D)[:, :, :heads], inputs.cos, inputs.sin).float()
    if inputs.logn is not None:
        q = q * inputs.logn.float()[:, :, None, None]
    scale = 1.0 / math.sqrt(D) if attn.scale_attn_weights else 1.0
    total = x.new_zeros((), dtype=torch.float32)
    weight = 0.0
    for row, row_targets in enumerate(targets):
        if not row_targets:
            continue
        queries = torch.tensor([t.query for t in row_targets], device=x.device)  # (N,)
        on_target = torch.zeros(len(row_targets), T, dtype=torch.bool, device=x.device)  # (N, T)
        for n, t in enumerate(row_targets):
            on_target[n, list(t.keys)] = True
        logits = torch.einsum("nhd,thd->nht", q[row, queries], k[row]) * scale  # (N, h, T)
        future = torch.arange(T, device=x.device)[None, :] > queries[:, None]  # (N, T)
        logp = logits.masked_fill(future[:, None, :], float("-inf")).log_softmax(-1)
        mass = logp.masked_fill(~on_target[:, None, :], float("-inf")).logsumexp(-1)  # (N, h) log mass
        weights = torch.tensor([t.weight for t in row_targets], device=x.device)
        total = total - (mass.mean(-1) * weights).sum()
        weight += float(weights.sum())
    return total / weight if weight else None
