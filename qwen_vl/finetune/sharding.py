"""FSDP for fine-tuning: shard the model over the processes of a torchrun group (``--fsdp``).

Each decoder block (``QWenBlock``) and each ViT block is one FSDP unit (``fully_shard``,
FSDP2); the root unit holds the rest (embeddings, ``ln_f``, ``lm_head``, the resampler and
the ViT's stem). Parameters stay sharded float32 master weights; with a bfloat16 compute
dtype each unit gathers them in bfloat16 for its forward and backward and reduces the
gradients in float32.

Our checkpoints hold full tensors: :func:`gather_trainable` and :class:`FullOptimizerState`
gather them (collectives: every rank calls them), :func:`load_trainable` and
``FullOptimizerState.load_state_dict`` shard them back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..model.llm import QWenBlock
from ..model.vision import VisualAttentionBlock

#: Module classes that become FSDP units of their own.
UNIT_CLASSES = (QWenBlock, VisualAttentionBlock)


def shard_model(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Shard ``model`` in place (its parameters become ``DTensor`` shards) and return it.

    ``compute_dtype`` other than the parameters' dtype turns mixed precision on
    (parameters gathered in ``compute_dtype``, gradients reduced in float32).
    """
    param_dtype = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype if compute_dtype != param_dtype else None,
        reduce_dtype=torch.float32 if compute_dtype != param_dtype else None,
    )
    units = [m for m in model.modules() if isinstance(m, UNIT_CLASSES)]
    if not units:
        raise ValueError(f"{type(model).__name__} has no {' or '.join(c.__name__ for c in UNIT_CLASSES)} to shard")
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def ensure_process_group(device: torch.device) -> None:
    """Sharding needs a process group: without torchrun, make one of this process alone."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce gradients in this backward (``True``) or only accumulate them locally."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective for a ``DTensor``), on the CPU."""
    t = t.detach()
    return (t.full_tensor() if isinstance(t, DTensor) else t).to("cpu", copy=True)


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable weights of a sharded model by name, as CPU tensors, on every rank."""
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Put full trainable weights (from :func:`gather_trainable`) back into a sharded model."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: its weights do not match this run's trainable weights "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def unshard_in_place(model: nn.Module) -> nn.Module:
    """Replace every sharded parameter by its whole tensor on the CPU (a collective), so that
    plain saving code sees an ordinary model. The model cannot train afterwards."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not isinstance(p, DTensor):
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(_full(p), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
    return model


class FullOptimizerState:
    """The optimizer state of a sharded model as one full (unsharded) state dict, keyed by
    parameter name, so that a checkpoint does not depend on the number of processes.

    ``state_dict()`` is a collective (every rank calls it); ``load_state_dict`` takes the
    full dict on every rank and keeps each rank's shard.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=options)


class Snapshot:
    """A state dict taken earlier, handed to code that calls ``state_dict()``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise TypeError("a Snapshot is read-only")
