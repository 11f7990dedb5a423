"""Named model sizes, for building a model with random weights (benchmarks without a checkpoint)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_VISION = {"image_size": 448, "patch_size": 14, "mlp_ratio": 4.9231, "image_start_id": 151857}

#: ``QWenConfig`` keyword arguments per preset. The resampler's output width equals
#: the LLM's hidden size and is a multiple of 128 (its attention heads are 128 wide).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # the sizes of the golden test checkpoint
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "kv_channels": 32,
        "intermediate_size": 688,
        "vocab_size": 151936,
        "seq_length": 512,
        "max_position_embeddings": 8192,
        "visual": {**_VISION, "width": 64, "layers": 2, "heads": 4, "output_dim": 128},
    },
    "small-cpu": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "kv_channels": 128,
        "intermediate_size": 2752,
        "vocab_size": 151936,
        "seq_length": 2048,
        "max_position_embeddings": 8192,
        "visual": {**_VISION, "width": 256, "layers": 2, "heads": 4, "output_dim": 512},
    },
    "qwen-vl-chat": {  # the published Qwen-VL-Chat sizes
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "kv_channels": 128,
        "intermediate_size": 22016,
        "vocab_size": 151936,
        "seq_length": 2048,
        "max_position_embeddings": 8192,
        "visual": {**_VISION, "width": 1664, "layers": 48, "heads": 16, "output_dim": 4096},
    },
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_model(preset: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ``QWenLMHeadModel`` of preset ``preset`` with random weights, created directly
    in ``dtype`` on ``device`` (so the large presets never pass through host memory)."""
    from ..config import QWenConfig
    from ..modeling import QWenLMHeadModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    config = QWenConfig(**PRESETS[preset])
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = QWenLMHeadModel(config)
    model.to(dtype)
    model.config.dtype = dtype
    return model.eval()
