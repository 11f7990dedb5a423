"""Load the model a run trains and decide which of its weights train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..modeling import QWenLMHeadModel
from ..quant.config import read_gptq_config
from .lora import apply_lora, load_qlora_base
from .settings import FinetuneSettings
from .trainable import TrainableSummary, enable_gradient_checkpointing, set_trainable, trainable_summary


@dataclass
class TrainingModel:
    """``wrapped``: what is saved (a peft model for LoRA, else the model itself);
    ``core``: the ``QWenLMHeadModel`` the loop calls (LoRA layers inside); ``dtype``: the
    compute dtype (under ``--fsdp`` the parameters stay float32 master weights)."""

    wrapped: nn.Module
    core: QWenLMHeadModel
    dtype: torch.dtype  # compute dtype
    summary: TrainableSummary
    autocast: torch.dtype | None = None  # mixed precision: run the forward under autocast to this dtype

    @property
    def is_peft(self) -> bool:
        return self.wrapped is not self.core

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights that train, by their names in ``core`` (CPU copies)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.core.named_parameters() if p.requires_grad}

    def load_trainable(self, weights: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
        """Put back weights saved by ``trainable_state``; every trainable weight must be there."""
        expected = {n for n, p in self.core.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source}: its weights do not match this run's trainable weights "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was it written with other "
                "--lora / --fix-vit / --train-embeddings options?"
            )
        params = dict(self.core.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU that has it, float32 otherwise."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def prepare_model(settings: FinetuneSettings, device: torch.device) -> TrainingModel:
    """The model of ``settings.model`` on ``device`` with its trainable weights chosen."""
    full = not settings.lora
    if full and read_gptq_config(settings.model) is not None:
        raise ValueError(
            f"{settings.model} is an Int4 GPTQ checkpoint: its 4-bit weights cannot be fully fine-tuned; "
            "use --q-lora (LoRA adapters over the frozen Int4 layers) or start from the float checkpoint"
        )
    dtype = training_dtype(settings.dtype, device)
    sharded = settings.fsdp or settings.deepspeed is not None
    if dtype == torch.float16 and sharded:
        raise ValueError("--dtype float16 (loss scaling) works without --fsdp / --deepspeed; use bfloat16 there")
    # Without sharding, bfloat16 / float16 runs are mixed precision: the weights that train are float32
    # (full fine-tuning loads every weight in float32), the forward runs under autocast.
    mixed = not sharded and not settings.q_lora and dtype != torch.float32
    if settings.q_lora:
        core = load_qlora_base(settings.model, compute_dtype=dtype, device=device)
    else:
        storage = torch.float32 if settings.fsdp or (mixed and full) else dtype  # FSDP casts per unit
        core = QWenLMHeadModel.from_pretrained(settings.model, dtype=storage, device=device)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(core)
    autocast = dtype if mixed else None
    if full:
        summary = set_trainable(core, fix_vit=settings.fix_vit, train_resampler=settings.train_resampler)
        return TrainingModel(core, core, dtype, summary, autocast)
    wrapped = apply_lora(
        core,
        settings.lora_settings(),
        train_embeddings=settings.train_embeddings,
        fix_vit=settings.fix_vit,
        train_resampler=settings.train_resampler,
    )
    if mixed:
        for param in wrapped.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # adapters and fully trained copies keep float32 weights
    return TrainingModel(wrapped, wrapped.get_base_model(), dtype, trainable_summary(wrapped), autocast)
