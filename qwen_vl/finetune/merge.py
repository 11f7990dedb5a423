"""Fold a LoRA adapter into its base model and write the official on-disk layout.

The output directory holds ``config.json``, sharded ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json``, and every other file of the base directory
that is not a weight file (``generation_config.json``, ``qwen.tiktoken``,
``tokenizer_config.json``, the official Python files when present) copied as is.
Parameter names are the official ones, so our loader and the official code both
read it. The directory appears complete or not at all.
"""

from __future__ import annotations

import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from ..model.loading import WEIGHT_LAYOUTS, CheckpointError, weight_files
from ..model.saving import save_checkpoint
from ..modeling import QWenLMHeadModel, resolve_dtype
from ..quant.config import read_gptq_config
from .lora import atomic_directory, load_adapter

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class MergeResult:
    """What ``merge_adapter`` wrote."""

    out_dir: Path
    weight_files: list[Path]
    copied_files: list[str]
    merged_layers: int
    num_parameters: int
    dtype: torch.dtype

    def __str__(self) -> str:
        return (
            f"merged {self.merged_layers} LoRA layers into {self.num_parameters:,} parameters ({self.dtype}); "
            f"wrote {len(self.weight_files)} weight file(s) and {len(self.copied_files)} other file(s) to {self.out_dir}"
        )


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (KB/MB/GB are powers of 10)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.fullmatch(str(size).strip())
        if match is None:
            raise ValueError(f"max shard size {size!r}: expected a number of bytes or a size like '5GB' or '500MB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if value <= 0:
        raise ValueError(f"max shard size must be positive, got {size!r}")
    return value


def merge_lora_layers(peft_model: PeftModel) -> int:
    """Add every LoRA update to its base weight, computed in float32 and rounded
    once to the weight's dtype; returns the number of layers merged."""
    merged = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue
        weight = module.get_base_layer().weight
        original = weight.dtype
        with torch.no_grad():
            weight.data = weight.data.float()
            for name in module.active_adapters:
                module.lora_A[name].float()
                module.lora_B[name].float()
            module.merge()
            weight.data = weight.data.to(original)
        merged += 1
    return merged


def _retie_embeddings(model: QWenLMHeadModel) -> None:
    """Share one weight between ``wte`` and ``lm_head`` again after merging."""
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    if head is wte:
        return
    if not torch.equal(head, wte):
        raise ValueError(
            "the config ties lm_head to transformer.wte but the merged weights differ: "
            "the adapter trained them separately"
        )
    model.lm_head.weight = wte


def _other_files(base_dir: Path) -> list[Path]:
    """Files of ``base_dir`` to copy: everything but weights, their index and config.json."""
    try:
        weights = {p.resolve() for p in weight_files(base_dir)}
    except CheckpointError:  # a directory of configs and tokenizer files only
        weights = set()
    skip = {"config.json", *(name for name, _ in WEIGHT_LAYOUTS)}
    return sorted(p for p in base_dir.iterdir() if p.is_file() and p.name not in skip and p.resolve() not in weights)


def write_model_directory(
    model: QWenLMHeadModel, base_dir: Path, out_dir: Path, *, max_shard_bytes: int, overwrite: bool = False
) -> tuple[list[Path], list[Path]]:
    """Write ``model`` to ``out_dir`` in the official layout (sharded safetensors, config)
    with the other files of ``base_dir`` (tokenizer, generation config) copied beside it,
    atomically. Returns the weight files and the copied files."""
    others = _other_files(base_dir)
    written: list[Path] = []

    def write(tmp: Path) -> None:
        written.extend(save_checkpoint(model, tmp, safe_serialization=True, max_shard_bytes=max_shard_bytes))
        for path in others:
            shutil.copy2(path, tmp / path.name)

    atomic_directory(out_dir, write, overwrite=overwrite)
    return [out_dir / p.name for p in written], others


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> MergeResult:
    """Load ``base_dir``, apply the LoRA adapter of ``adapter_dir``, fold it in and
    write the result to ``out_dir`` in ``dtype`` ("auto" = the base config's).

    Weights trained in full by the adapter (embeddings, resampler) replace the
    base's. The merge runs on CPU.
    """
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir}: no config.json (not a checkpoint directory)")
    for source in (base_dir, adapter_dir):
        if out_dir.resolve() == source.resolve():
            raise ValueError(f"the output directory {out_dir} is the input directory {source}: choose a new one")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (choose another directory or allow overwriting)")
    if read_gptq_config(base_dir) is not None:
        raise ValueError(
            f"{base_dir} is an Int4 GPTQ checkpoint: an adapter cannot be folded into 4-bit weights; merge it "
            "into the float checkpoint the Int4 one was made from, then `qwen-vl quantize` the result"
        )
    max_bytes = parse_size(max_shard_size)
    model = QWenLMHeadModel.from_pretrained(base_dir, dtype=dtype, device="cpu")
    out_dtype = next(model.parameters()).dtype
    peft_model = load_adapter(model, adapter_dir)
    merged_layers = merge_lora_layers(peft_model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All adapters are already merged", category=UserWarning)
        merged = peft_model.merge_and_unload()  # LoRA layers are merged: this unwraps and swaps in modules_to_save
    if merged.config.tie_word_embeddings:
        _retie_embeddings(merged)
    merged.config.dtype = out_dtype
    written, others = write_model_directory(merged, base_dir, out_dir, max_shard_bytes=max_bytes, overwrite=overwrite)
    num_parameters = sum(p.numel() for p in {id(p): p for p in merged.parameters()}.values())
    return MergeResult(
        out_dir=out_dir,
        weight_files=written,
        copied_files=[p.name for p in others],
        merged_layers=merged_layers,
        num_parameters=num_parameters,
        dtype=out_dtype,
    )


def merge(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    echo=print,
) -> MergeResult:
    """``qwen-vl merge``: check the arguments, merge, and report one line through ``echo``.

    Errors are ``FileNotFoundError`` / ``FileExistsError`` / ``ValueError`` naming the path or value.
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not base.is_dir():
        raise FileNotFoundError(f"base model {base}: no such directory")
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter {adapter}: no such directory")
    if dtype != "auto":
        resolve_dtype(dtype, None)  # an unknown name fails before any loading
    parse_size(max_shard_size)
    result = merge_adapter(base, adapter, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    echo(str(result))
    return result
