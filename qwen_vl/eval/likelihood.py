"""Score the options of a multiple-choice item by the model's loss on each, as
Qwen-VL's evaluation does for ScienceQA and SEED-Bench: the option whose tokens
have the lowest average loss after the prompt wins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def option_losses(
    model, context_ids: list[int], options: Sequence[list[int]], images: Sequence[Any] = ()
) -> list[float]:
    """Average token loss of each option's ids (n,) when it follows ``context_ids``.

    All options run as one right-padded batch; ``images`` are the item's images in
    span order (repeated for each row; the model's image cache encodes them once).
    ``lm_head`` runs on the option positions only.
    """
    if not options or any(len(o) == 0 for o in options):
        raise ValueError("every option needs at least one token")
    device = model.lm_head.weight.device
    rows = [list(context_ids) + list(o) for o in options]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    ids, mask = ids.to(device), mask.to(device)
    encode = model.span_encoder(list(images) * len(rows) if images else None)
    hidden, _ = model.transformer(ids, attention_mask=None if bool(mask.all()) else mask, encode_spans=encode)
    losses = []
    start = len(context_ids)
    for i, option in enumerate(options):
        h = hidden[i, start - 1 : start - 1 + len(option)]  # (n, C): positions that predict the option
        logits = model.lm_head(h).float()
        target = torch.tensor(option, device=device)
        losses.append(F.cross_entropy(logits, target).item())
    return losses
