"""The model's forward output, defined here so that it does not depend on the field
names of transformers' own output classes (which change between releases)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput


@dataclass
class QWenCausalLMOutput(ModelOutput):
    """``loss`` (with labels), ``logits`` (B, T, vocab) unless skipped, the ``cache`` the
    forward wrote into (if one was given) and per-layer ``hidden_states`` on request."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
