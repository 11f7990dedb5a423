"""A checkpoint with fresh random weights, for training a model from scratch.

The weights come from the model's own initialisation (``initializer_range``),
drawn from a seed, so the same config and seed give the same checkpoint.

With random weights the resampler's queries attend almost evenly to every patch
(the largest attention weight is about 1/100 for 256 patches), so its 256 outputs
are nearly the same average of the picture and training tends to learn to ignore
them. ``localise_resampler`` starts each query on its own patch instead: query i
attends mostly to patch i, through the fixed 2-D position table, and passes that
patch's feature on. Training from scratch should start from it
(``qwen-vl init --resampler local``, the default).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import QWenConfig
from ..model.vision import Resampler
from ..modeling import QWenLMHeadModel, resolve_dtype
from .merge import DEFAULT_MAX_SHARD_SIZE, parse_size, write_model_directory

RESAMPLER_INITS = ("local", "random")


@torch.no_grad()
def localise_resampler(resampler: Resampler, sharpness: float = 6.0, key_gain: float = 0.1) -> None:
    """Set ``resampler`` so that query i attends mostly to patch i and outputs its feature.

    The learned queries become zero, so a query is its position embedding alone; the
    patch features are scaled by ``key_gain`` in ``ln_kv`` so that keys are mostly
    position; the query and key projections are ``sharpness`` x identity (the attention
    logit of a query on its own patch exceeds its neighbours' by several units), and the
    value projection undoes ``key_gain``. Needs as many queries as patches.
    """
    dim = resampler.query.shape[1]
    eye = torch.eye(dim, dtype=resampler.query.dtype, device=resampler.query.device)
    resampler.query.zero_()
    resampler.ln_q.reset_parameters()
    resampler.ln_kv.reset_parameters()
    resampler.ln_kv.weight.fill_(key_gain)
    resampler.attn.in_proj_weight.copy_(torch.cat([sharpness * eye, sharpness * eye, eye / key_gain]))
    resampler.attn.in_proj_bias.zero_()
    resampler.attn.out_proj.weight.copy_(eye)
    resampler.attn.out_proj.bias.zero_()


def init_checkpoint(
    like: str | Path,
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    resampler: str = "local",
) -> list[Path]:
    """Write a randomly initialised model to ``out_dir`` in the official layout.

    ``like`` is a directory with the tokenizer and generation files to copy (and
    ``config.json``, unless ``config`` names another one). ``dtype``: a name such as
    "bfloat16", or "auto" for the config's. ``resampler``: "local" (see
    ``localise_resampler``) or "random". Returns the weight files.
    """
    if resampler not in RESAMPLER_INITS:
        raise ValueError(f"resampler must be one of {', '.join(RESAMPLER_INITS)}, got {resampler!r}")
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
    model = QWenLMHeadModel(cfg)
    if resampler == "local":
        localise_resampler(model.transformer.visual.attn_pool)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    written, _ = write_model_directory(
        model, like, Path(out_dir), max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite
    )
    return written
