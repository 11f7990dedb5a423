"""A checkpoint with fresh random weights, for training a model from scratch.

The weights come from the model's own initialisation (``initializer_range``),
drawn from a seed, so the same config and seed give the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import QWenConfig
from ..modeling import QWenLMHeadModel, resolve_dtype
from .merge import DEFAULT_MAX_SHARD_SIZE, parse_size, write_model_directory


def init_checkpoint(
    like: str | Path,
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> list[Path]:
    """Write a randomly initialised model to ``out_dir`` in the official layout.

    ``like`` is a directory with the tokenizer and generation files to copy (and
    ``config.json``, unless ``config`` names another one). ``dtype``: a name such as
    "bfloat16", or "auto" for the config's. Returns the weight files.
    """
    like = Path(like)
    config_path = Path(config) if config is not None else like / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"config file not found: {config_path}")
    if not (like / "qwen.tiktoken").is_file():
        raise FileNotFoundError(f"{like}: no qwen.tiktoken (the tokenizer files are copied from this directory)")
    cfg = QWenConfig.from_json_file(str(config_path))
    cfg.validate_sizes()
    torch_dtype = resolve_dtype(dtype, cfg)
    torch.manual_seed(seed)
    model = QWenLMHeadModel(cfg).to(torch_dtype)
    model.config.dtype = torch_dtype
    written, _ = write_model_directory(
        model, like, Path(out_dir), max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite
    )
    return written
