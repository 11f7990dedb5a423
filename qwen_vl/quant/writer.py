"""Turn GPTQ results into ``QuantLinear`` layers and write the official Int4 layout.

The output directory holds what Qwen-VL-Chat-Int4 holds: ``config.json`` with a
``quantization_config`` (quant_method "gptq"), AutoGPTQ's ``quantize_config.json``
with the same fields, the weights as ``model.safetensors`` (or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``), each
quantized layer as ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` (+ ``bias``),
and every other file of the source directory that is not a weight file or a
config (tokenizer files, ``generation_config.json``) copied as is. The directory
is written under a temporary name and renamed into place: it appears complete or
not at all.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..finetune.lora import atomic_directory
from ..model.loading import WEIGHT_LAYOUTS, CheckpointError, weight_files
from ..model.saving import atomic_write, save_checkpoint
from .config import QUANTIZE_CONFIG, GPTQConfig
from .gptq import QuantizedWeight
from .linear import QuantLinear


def install_results(model: nn.Module, results: Mapping[str, QuantizedWeight], zero_offset: int = 1) -> None:
    """Replace each float linear layer of ``model`` named in ``results`` by its ``QuantLinear``
    (``zero_offset``: 1 for the "gptq" checkpoint format); the bias keeps its values and dtype.
    The new layers live on CPU (the writer's device)."""
    for name, result in results.items():
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name} is a {type(linear).__name__}, not a float linear layer")
        bias = linear.bias.detach().cpu() if linear.bias is not None else None
        layer = QuantLinear.from_codes(
            result.codes, result.scales, result.zeros, result.g_idx, bias, result.group_size, zero_offset
        )
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)


def _other_files(source: Path) -> list[Path]:
    try:
        weights = {p.resolve() for p in weight_files(source)}
    except CheckpointError:
        weights = set()
    skip = {"config.json", QUANTIZE_CONFIG, *(name for name, _ in WEIGHT_LAYOUTS)}
    return sorted(p for p in source.iterdir() if p.is_file() and p.name not in skip and p.resolve() not in weights)


def write_quantized(
    model: nn.Module,
    source: str | Path,
    out_dir: str | Path,
    gptq: GPTQConfig,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``model`` (its quantized layers already ``QuantLinear``) to ``out_dir`` with
    ``gptq`` recorded in both config files; returns the weight files written."""
    source, out_dir = Path(source), Path(out_dir)
    model.config.quantization_config = gptq.to_dict()
    others = _other_files(source)
    quantize_config = json.dumps(gptq.to_dict(), indent=2) + "\n"
    written: list[Path] = []

    def write(tmp: Path) -> None:
        written.extend(save_checkpoint(model, tmp, safe_serialization=True, max_shard_bytes=max_shard_bytes))
        atomic_write(tmp / QUANTIZE_CONFIG, lambda p: p.write_text(quantize_config, encoding="utf-8"))
        for path in others:
            shutil.copy2(path, tmp / path.name)

    atomic_directory(out_dir, write, overwrite=overwrite)
    return [out_dir / p.name for p in written]


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of every ``QuantLinear`` in ``model``, by checkpoint name."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for key, tensor in module.state_dict().items():
                state[f"{name}.{key}"] = tensor
    return state
