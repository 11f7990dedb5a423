"""The training dataset over validated examples, and the collator that batches its items.

Items keep ids and labels in memory; pixels are read from disk only when an item is taken,
so a dataset of many images costs no memory up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..images import ImagePolicy, image_transform, load_image
from .supervised import IGNORE_INDEX, Example


class SupervisedDataset(Dataset):
    """Validated examples as training items.

    ``image_size`` is the vision tower's input size (``config.visual["image_size"]``). Each item is
    ``{"input_ids": (T,) long, "labels": (T,) long, "image_paths": [str], "images": [(3, S, S) float]}``,
    images in span order. ``lengths[i]`` and ``trainable_tokens[i]`` give item i's token count and
    trained-label count without loading it.
    """

    def __init__(self, examples: Sequence[Example], image_size: int) -> None:
        self.examples = list(examples)
        self.image_size = int(image_size)
        self.lengths = [e.num_tokens for e in self.examples]
        self.trainable_tokens = [e.num_trainable for e in self.examples]
        self._policies: dict[str, ImagePolicy] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _policy(self, root: str) -> ImagePolicy:
        if root not in self._policies:
            self._policies[root] = ImagePolicy(allowed_roots=(root,))
        return self._policies[root]

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        policy = self._policy(example.image_root)
        images = [image_transform(load_image(Path(p), policy), self.image_size) for p in example.image_paths]
        return {
            "input_ids": torch.tensor(example.input_ids, dtype=torch.long),  # (T,)
            "labels": torch.tensor(example.labels, dtype=torch.long),  # (T,)
            "image_paths": list(example.image_paths),
            "images": images,  # each (3, S, S)
            "look": example.look,  # LookTarget per covered answer token (finetune.regions)
        }


def collate(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of items into model inputs.

    Returns ``input_ids`` (B, T) padded with ``pad_id``, ``attention_mask`` (B, T) (1 = real
    token), ``labels`` (B, T) padded with -100, and ``images``: every item's pixel tensors in
    span order, item after item (the order the model fills ``<img>`` spans in), or ``None``.
    Only when some item has look targets (its answers give ``regions``), ``look`` holds each row's.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(item["input_ids"].numel() for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)  # (B, T)
    images: list[torch.Tensor] = []
    for row, item in enumerate(batch):
        n = item["input_ids"].numel()
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = 1
        images.extend(item.get("images") or [])
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images or None}
    look = [tuple(item.get("look") or ()) for item in batch]
    if any(look):
        out["look"] = look  # not a model input: the trainer's look loss takes it
    return out
