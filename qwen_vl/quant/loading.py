"""Build ``QuantLinear`` layers where an Int4 GPTQ checkpoint has them, before its
tensors are loaded, and choose their kernel after.

The checkpoint decides which layers are quantized: a linear layer whose
``<name>.qweight`` is in the files becomes a ``QuantLinear``; one with
``<name>.weight`` stays a float ``nn.Linear``. In Qwen-VL-Chat-Int4 (AutoGPTQ's
Qwen recipe: the decoder blocks' ``attn.c_attn``, ``attn.c_proj``, ``mlp.w1``,
``mlp.w2``, ``mlp.c_proj``; ``transformer.visual``, ``wte``, ``ln_f`` and ``lm_head``
left outside) that is the five linear layers of every decoder block.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..model.loading import CheckpointError, weight_files
from .config import GPTQConfig
from .linear import QuantLinear


def checkpoint_keys(ckpt_dir: str | Path) -> set[str]:
    """The tensor names of a checkpoint directory, read without loading the tensors."""
    ckpt_dir = Path(ckpt_dir)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (ckpt_dir / index).is_file():
            weight_files(ckpt_dir)  # validates the index and its shards
            return set(json.loads((ckpt_dir / index).read_text(encoding="utf-8"))["weight_map"])
    keys: set[str] = set()
    for path in weight_files(ckpt_dir):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys.update(f.keys())
        else:
            try:
                keys.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys())
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    return keys


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def install_quant_linears(model: nn.Module, ckpt_dir: str | Path, gptq: GPTQConfig) -> list[str]:
    """Replace (on the meta device) every ``nn.Linear`` of ``model`` whose ``qweight`` is
    in ``ckpt_dir`` by a ``QuantLinear``; returns their names.

    Raises ``CheckpointError`` when the config declares GPTQ but no tensor is quantized.
    """
    keys = checkpoint_keys(ckpt_dir)
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or f"{name}.qweight" not in keys:
            continue
        layer = QuantLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            group_size=gptq.group_size_for(module.in_features),
            zero_offset=gptq.zero_offset,
            device="meta",
            g_idx_in_checkpoint=f"{name}.g_idx" in keys,
        )
        _replace(model, name, layer)
        replaced.append(name)
    if not replaced:
        raise CheckpointError(
            f"{ckpt_dir}: the config declares GPTQ quantization but no '<layer>.qweight' tensor is in the weight files"
        )
    return replaced


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """The ``QuantLinear`` layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def select_kernels(
    model: nn.Module, dtype: torch.dtype, requested: str = "auto", device: torch.device | str | None = None
) -> dict[str, int]:
    """Choose and prepare the int4 kernel of every ``QuantLinear`` (see ``kernels.select_kernel``)
    for activations of ``dtype``; returns how many layers run each kernel.

    ``device`` moves the layers' plain-grouping ``g_idx`` (not loaded from the files) there first.
    """
    chosen: Counter[str] = Counter()
    for name, layer in quant_linears(model).items():
        if device is not None and layer.g_idx.device != torch.device(device):
            layer.g_idx = layer.g_idx.to(device)
        try:
            chosen[layer.use_kernel(requested, dtype)] += 1
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return dict(chosen)
