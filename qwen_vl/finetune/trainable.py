"""Which parameters train, and activation checkpointing for training.

The parts of the model, by checkpoint name:

* ``vision``: the ViT, ``transformer.visual.*`` except the resampler; this
  includes ``ln_post`` and ``proj``, which the official fine-tuning script also
  freezes with ``--fix_vit``.
* ``resampler``: ``transformer.visual.attn_pool`` (the cross-attention pooling
  into 256 queries). Its ``pos_embed`` is a fixed 2-D sine-cosine table and never
  trains.
* ``embeddings``: ``transformer.wte`` and ``lm_head``.
* ``llm``: the decoder blocks ``transformer.h.*`` and ``transformer.ln_f``.
* ``lora``: adapter weights added by peft.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

VISION = "transformer.visual"
RESAMPLER = "transformer.visual.attn_pool"
EMBEDDINGS = ("transformer.wte", "lm_head")
#: Parameters that hold fixed tables and stay frozen whatever the mode.
FIXED_PARAMETERS = ("transformer.visual.attn_pool.pos_embed",)
PARTS = ("vision", "resampler", "llm", "embeddings", "lora")


def checkpoint_name(name: str) -> str:
    """The checkpoint name behind a parameter name of a (peft-wrapped) model:
    ``base_model.model.`` and peft's wrapper levels (``base_layer``,
    ``modules_to_save.<adapter>``, ``original_module``) are removed."""
    parts = name.removeprefix("base_model.model.").split(".")
    out: list[str] = []
    skip = 0
    for part in parts:
        if skip:
            skip -= 1
            continue
        if part == "modules_to_save":
            skip = 1  # the adapter name that follows
            continue
        if part in ("base_layer", "original_module"):
            continue
        out.append(part)
    return ".".join(out)


def part_of(name: str) -> str:
    """One of ``PARTS`` for a parameter name (plain or peft-wrapped)."""
    if ".lora_" in name:
        return "lora"
    key = checkpoint_name(name)
    if _under(key, RESAMPLER):
        return "resampler"
    if _under(key, VISION):
        return "vision"
    if any(_under(key, prefix) for prefix in EMBEDDINGS):
        return "embeddings"
    return "llm"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@dataclass
class TrainableSummary:
    """Counts of trainable and total parameters (shared tensors counted once)."""

    trainable: int
    total: int
    by_part: dict[str, tuple[int, int]] = field(default_factory=dict)  # part -> (trainable, total)

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        lines = [f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.2f}%)"]
        for part in PARTS:
            if part in self.by_part:
                t, n = self.by_part[part]
                lines.append(f"  {part:<10} {t:>15,} of {n:>15,}")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable / total parameters of ``model`` overall and per part.

    peft keeps a frozen original of each module it trains in full; those
    originals are not counted."""
    seen: set[int] = set()
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        if id(param) in seen or ".original_module." in name:
            continue
        seen.add(id(param))
        slot = counts[part_of(name)]
        slot[1] += param.numel()
        if param.requires_grad:
            slot[0] += param.numel()
    by_part = {p: (counts[p][0], counts[p][1]) for p in PARTS if p in counts}
    return TrainableSummary(
        trainable=sum(t for t, _ in by_part.values()), total=sum(n for _, n in by_part.values()), by_part=by_part
    )


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that require gradients."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def set_trainable(
    model: nn.Module, *, fix_vit: bool, train_resampler: bool = True, train_llm: bool = True
) -> TrainableSummary:
    """Choose the parameters of a full fine-tune (not a peft model: see ``lora.apply_lora``).

    ``train_llm``: the decoder blocks, ``ln_f``, ``wte`` and ``lm_head``;
    ``fix_vit`` freezes the vision part; ``train_resampler`` trains
    ``transformer.visual.attn_pool`` whatever ``fix_vit`` says. Parameters in
    ``FIXED_PARAMETERS`` stay frozen. Returns the resulting counts.
    """
    if any(".lora_" in n or ".modules_to_save." in n for n, _ in model.named_parameters()):
        raise TypeError(
            "set_trainable is for full fine-tuning; a peft model gets its trainable parts from "
            "apply_lora(..., fix_vit=..., train_resampler=..., train_embeddings=...)"
        )
    wanted = {"llm": train_llm, "embeddings": train_llm, "vision": not fix_vit, "resampler": train_resampler}
    for name, param in model.named_parameters():
        param.requires_grad_(wanted[part_of(name)] and name not in FIXED_PARAMETERS)
    return trainable_summary(model)


def vision_modules_to_save(*, fix_vit: bool, train_resampler: bool) -> list[str]:
    """The vision modules a LoRA run trains in full (peft ``modules_to_save``).

    Without ``fix_vit`` the whole vision tower trains (resampler included);
    with it, only the resampler when ``train_resampler``.
    """
    if not fix_vit:
        return [VISION]
    return [RESAMPLER] if train_resampler else []


def freeze_fixed_parameters(model: nn.Module) -> None:
    """Keep ``FIXED_PARAMETERS`` (and peft's copies of them) frozen."""
    for name, param in model.named_parameters():
        if checkpoint_name(name) in FIXED_PARAMETERS:
            param.requires_grad_(False)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass: decoder blocks and ViT blocks.

    Works on a plain model and on a peft model alike. The blocks are checkpointed
    non-reentrantly, so gradients reach the adapter weights even when the block
    inputs do not require gradients (no input-gradient hook is needed).
    """
    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing") and isinstance(module.gradient_checkpointing, bool):
            module.gradient_checkpointing = True
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no module that supports gradient checkpointing")
