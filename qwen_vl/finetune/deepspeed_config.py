"""DeepSpeed configs for ``--deepspeed``: the shipped ones by name, and ``"auto"`` values
filled from the run's options.

A config is any DeepSpeed JSON file. ``"auto"`` is allowed for the keys listed in
``AUTO_KEYS``; a number that contradicts an option of the run (batch size,
accumulation, clipping, dtype) is an error naming the key, never silently replaced.
The schedule comes from ``--lr-scheduler`` / ``--warmup-ratio``: a ``scheduler``
section is refused. With an ``optimizer`` section DeepSpeed builds the optimizer
(needed for ``offload_optimizer``); without one the run's AdamW is used.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from .settings import FinetuneSettings

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SHIPPED = ("zero2", "zero3", "zero3_offload")
AUTO_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config cannot be used; the message names the file and the key."""


def config_path(name: str | Path) -> Path:
    """The file of a shipped config name (``zero2``, ``zero3``, ``zero3_offload``) or a path."""
    if str(name) in SHIPPED:
        return CONFIG_DIR / f"{name}.json"
    path = Path(name)
    if not path.is_file():
        raise DeepSpeedConfigError(f"--deepspeed {name}: no such file, and not one of {', '.join(SHIPPED)}")
    return path


def load_config(name: str | Path) -> tuple[dict[str, Any], Path]:
    """The JSON object of a config (by name or path) and the file it came from."""
    path = config_path(name)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{path}: the config must be a JSON object, got {type(config).__name__}")
    return config, path


def _walk(config: dict[str, Any], prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, name + ".")
        else:
            yield name, value


def _get(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def resolve_config(
    config: dict[str, Any],
    settings: FinetuneSettings,
    *,
    world_size: int,
    dtype: torch.dtype,
    hidden_size: int,
    source: str | Path = "DeepSpeed config",
) -> dict[str, Any]:
    """A copy of ``config`` with every ``"auto"`` filled and checked against the run.

    ``dtype`` is the training dtype (the model's parameters); ``hidden_size`` sizes the
    ZeRO buckets. Raises :class:`DeepSpeedConfigError` naming the file and key.
    """
    out = copy.deepcopy(config)
    s = settings
    wanted: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": s.batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "train_batch_size": s.batch_size * s.gradient_accumulation_steps * world_size,
        "gradient_clipping": s.max_grad_norm,
        "bf16.enabled": dtype == torch.bfloat16,
        "fp16.enabled": False,
    }
    defaults: dict[str, Any] = {
        "optimizer.params.lr": s.learning_rate,
        "optimizer.params.betas": [s.adam_beta1, s.adam_beta2],
        "optimizer.params.eps": s.adam_epsilon,
        "optimizer.params.weight_decay": s.weight_decay,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in _walk(config):
        if value == "auto" and key not in AUTO_KEYS:
            raise DeepSpeedConfigError(f'{source}: {key}: "auto" is not supported here (only {", ".join(AUTO_KEYS)})')
    if "scheduler" in config:
        raise DeepSpeedConfigError(
            f"{source}: scheduler: remove this section; --lr-scheduler and --warmup-ratio set the schedule"
        )
    if _get(config, "fp16.enabled") is True:
        raise DeepSpeedConfigError(f"{source}: fp16.enabled: float16 is not supported with --deepspeed; use bf16")
    for key, value in wanted.items():
        given = _get(config, key)
        if given is None or given == "auto":
            _set(out, key, value)
        elif given != value:
            raise DeepSpeedConfigError(
                f'{source}: {key} is {given!r} but the run\'s options give {value!r}; set it to "auto" or match '
                "--batch-size, --gradient-accumulation-steps, --max-grad-norm, --dtype and the number of processes"
            )
    for key, value in defaults.items():
        if _get(config, key) == "auto":
            _set(out, key, value)
    out.setdefault("zero_allow_untested_optimizer", True)
    return out


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a config (0 without ``zero_optimization``)."""
    return int(_get(config, "zero_optimization.stage") or 0)
