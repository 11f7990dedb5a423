"""DeepSpeed for ``--deepspeed``: start the engine, gather ZeRO-3 partitions for saving,
and keep the engine's own (partitioned) state inside our checkpoints.

``deepspeed`` is imported only here and only when asked for. A checkpoint of a
DeepSpeed run holds, besides our files, the engine's checkpoint in ``deepspeed/``
(optimizer partitions of every rank; ZeRO-3 also its parameter partitions), written
by all ranks into a staging directory beside the output (the output directory must be
on a file system every node sees) and moved in by rank 0.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import barrier

ENGINE_DIR = "deepspeed"
TAG = "state"
MISSING = "--deepspeed needs the deepspeed package: pip install --no-build-isolation deepspeed"


class DeepSpeedUnavailableError(RuntimeError):
    """``--deepspeed`` was asked for and the ``deepspeed`` package cannot be imported."""


def import_deepspeed(device: torch.device) -> Any:
    """The ``deepspeed`` module (on a CPU run, with its CPU accelerator chosen first)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise DeepSpeedUnavailableError(f"{MISSING} ({e})") from e
    return deepspeed


def start_engine(
    model: nn.Module,
    groups: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer | None,
    scheduler_factory: Callable[[torch.optim.Optimizer], Any],
    config: dict[str, Any],
    device: torch.device,
) -> Any:
    """``deepspeed.initialize`` over ``model``: with ``optimizer`` (the run's AdamW) when the
    config has no ``optimizer`` section, else DeepSpeed's own over the parameter ``groups``.
    The scheduler is built on the engine's base optimizer and stepped by the engine."""
    deepspeed = import_deepspeed(device)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=None if "optimizer" in config else optimizer,
        model_parameters=groups if "optimizer" in config else None,
        lr_scheduler=scheduler_factory,
        config=config,
        dist_init_required=not torch.distributed.is_initialized(),
    )
    return engine


def _zero3_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if hasattr(p, "ds_id")]


@contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Whole ZeRO-3 parameters on every rank inside the block (read-only); a no-op otherwise."""
    partitioned = _zero3_params(params)
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable weights by name, as CPU tensors, on every rank (a collective under ZeRO-3)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named]):
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_engine_state(engine: Any, out_dir: Path, step: int) -> Path:
    """Every rank writes its part of the engine's state to a staging directory (a collective)."""
    staging = Path(out_dir) / f".deepspeed-{step}"
    if engine.global_rank == 0 and staging.exists():
        shutil.rmtree(staging)
    barrier()
    engine.save_checkpoint(str(staging), tag=TAG, save_latest=False)
    barrier()
    return staging


def load_engine_state(engine: Any, checkpoint: Path) -> None:
    """Restore the engine's weights, optimizer and scheduler from a checkpoint of ours."""
    folder = Path(checkpoint) / ENGINE_DIR
    if not (folder / TAG).is_dir():
        raise FileNotFoundError(f"{folder / TAG}: missing; {checkpoint} was not written by a --deepspeed run")
    path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"{folder / TAG}: DeepSpeed could not load it")
