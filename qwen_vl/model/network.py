"""The Qwen-VL network: token embeddings with image features spliced into the
``<img>`` spans, the decoder stack, and the final norm (``transformer.*`` keys).

It sees token ids, image pixels or features, and a key/value cache; it knows no
tokenizer, files or generation policy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import QWenConfig
from .attention_inputs import build_attention_inputs
from .image_spans import ImageSpan, find_image_spans
from .llm import QWenBlock, RMSNorm
from .vision import VisionTransformer

#: Turns the image spans of a batch into features (N, 256, hidden), one per span.
SpanEncoder = Callable[[torch.Tensor, list[ImageSpan]], torch.Tensor]


class QWenModel(nn.Module):
    """``transformer``: wte, h.{i}, ln_f and the vision tower ``visual``."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(**config.visual)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache=None,
        encode_spans: SpanEncoder | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Hidden states after ``ln_f`` (B, T, C) and, if asked, every layer's input."""
        B, T = input_ids.shape
        h = self.drop(self.wte(input_ids))  # (B, T, C)
        spans = find_image_spans(input_ids, self.config.image_start_id, self.config.num_image_queries)
        if spans:
            if encode_spans is None:
                raise ValueError("the prompt holds <img> spans but no image encoder was given")
            features = encode_spans(input_ids, spans).to(h.dtype)  # (N, 256, C)
            h = h.clone()
            for feature, span in zip(features, spans):
                h[span.row, span.start + 1 : span.end] = feature
        elif self.training:
            # Keep the vision tower in the graph so data-parallel wrappers see its gradients.
            size = int(self.config.visual["image_size"])
            dummy = self.visual(torch.zeros(1, 3, size, size, device=h.device, dtype=h.dtype))
            h = h + dummy.mean() * 0

        inputs = build_attention_inputs(self.config, attention_mask, (B, T), h.device, kv_cache, self.training)
        hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        for block in self.h:
            if hidden_states is not None:
                hidden_states.append(h)
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, inputs, use_reentrant=False)
            else:
                h = block(h, inputs)
        if inputs.kv_cache is not None:
            inputs.kv_cache.commit()
        h = self.ln_f(h)
        if hidden_states is not None:
            hidden_states.append(h)
        return h, hidden_states
