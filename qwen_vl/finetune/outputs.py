"""The final result of a run, in ``OUTPUT_DIR/final``: a LoRA adapter in peft's format,
or a full model in the official on-disk layout."""

from __future__ import annotations

from pathlib import Path

from .lora import save_adapter
from .merge import DEFAULT_MAX_SHARD_SIZE, parse_size, write_model_directory
from .model_setup import TrainingModel
from .settings import FinetuneSettings

FINAL_DIR = "final"


def save_final(tm: TrainingModel, settings: FinetuneSettings, out_dir: str | Path) -> Path:
    """Write ``out_dir/final`` atomically (replacing an earlier one) and return it.

    LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (load with
    ``peft.PeftModel.from_pretrained`` or fold in with ``qwen-vl merge``). Full:
    config, sharded safetensors and the base directory's tokenizer and generation
    files, loadable like the checkpoint it started from.
    """
    final = Path(out_dir) / FINAL_DIR
    was_training = tm.core.training
    tm.core.eval()
    try:
        if tm.is_peft:
            return save_adapter(tm.wrapped, final, overwrite=True)
        max_bytes = parse_size(settings.extra.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
        write_model_directory(tm.core, Path(settings.model), final, max_shard_bytes=max_bytes, overwrite=True)
        return final
    finally:
        tm.core.train(was_training)
