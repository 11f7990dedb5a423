"""Model configuration read from an official Qwen-VL ``config.json``.

Field names and defaults follow the official file, so an unchanged checkpoint
directory loads as is. Sizes that follow from other fields are properties, never
stored copies, so they cannot drift. Keys we do not know are kept.
"""

from __future__ import annotations

import json
import math
from typing import Any

from transformers import PretrainedConfig

#: Defaults of the official Qwen-VL vision tower (``config.json`` → ``visual``).
VISUAL_DEFAULTS: dict[str, Any] = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
}


class QWenConfig(PretrainedConfig):
    """Configuration of a Qwen-VL model (the official ``model_type: "qwen"``)."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 8192,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        kv_channels: int = 128,
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        use_flash_attn: Any = "auto",
        intermediate_size: int = 22016,
        no_bias: bool = True,
        tie_word_embeddings: bool = False,
        seq_length: int = 2048,
        visual: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.intermediate_size = intermediate_size
        self.no_bias = no_bias
        self.seq_length = seq_length
        self.visual = {**VISUAL_DEFAULTS, **(visual or {})}
        if "torch_dtype" in kwargs:  # the official files' name for ``dtype``
            legacy = kwargs.pop("torch_dtype")
            kwargs.setdefault("dtype", legacy)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_sizes()

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as saved; also writes ``torch_dtype``, the key that loaders of
        the official format (and older transformers) read."""
        out = json.loads(super().to_json_string(use_diff=use_diff))
        if out.get("dtype") is not None:
            out["torch_dtype"] = out["dtype"]
        return json.dumps(out, indent=2, sort_keys=True) + "\n"

    # ----- derived sizes -------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one attention head of the language model."""
        return self.hidden_size // self.num_attention_heads

    @property
    def projection_size(self) -> int:
        """Total width of q (and of k, of v): ``kv_channels * num_attention_heads``."""
        return self.kv_channels * self.num_attention_heads

    @property
    def ffn_hidden_size(self) -> int:
        """Output width of each of ``w1`` and ``w2`` (``intermediate_size // 2``)."""
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        """Number of leading channels of each head that rotary embedding rotates."""
        if self.rotary_pct == 1.0:
            return self.kv_channels
        return int(self.kv_channels * self.rotary_pct)

    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2

    @property
    def num_image_queries(self) -> int:
        """Number of features (and prompt positions) one image takes: 256 in Qwen-VL."""
        return 256

    def validate_sizes(self) -> None:
        """Raise ``ValueError`` naming the field when sizes cannot form a model."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config.json: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.projection_size != self.hidden_size:
            raise ValueError(
                f"config.json: kv_channels * num_attention_heads ({self.projection_size}) "
                f"must equal hidden_size ({self.hidden_size})"
            )
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ValueError(f"config.json: rotary dimension {self.rotary_dim} must be even and positive")
        v = self.visual
        if int(v["output_dim"]) != self.hidden_size:
            raise ValueError(
                f"config.json: visual.output_dim ({v['output_dim']}) must equal hidden_size ({self.hidden_size})"
            )
        if int(v["output_dim"]) % 128:
            raise ValueError(f"config.json: visual.output_dim ({v['output_dim']}) must be a multiple of 128")
        if int(v["width"]) % int(v["heads"]):
            raise ValueError(
                f"config.json: visual.width ({v['width']}) must be divisible by visual.heads ({v['heads']})"
            )
        if int(v["image_size"]) % int(v["patch_size"]):
            raise ValueError(
                f"config.json: visual.image_size ({v['image_size']}) must be a multiple of "
                f"visual.patch_size ({v['patch_size']})"
            )
        grid = int(v["image_size"]) // int(v["patch_size"])
        if math.isqrt(grid * grid) != grid:
            raise ValueError("config.json: visual patch grid must be square")
        if self.image_pad_id >= self.vocab_size:
            raise ValueError(f"config.json: visual.image_start_id ({self.image_start_id}) + 2 must be below vocab_size")
