"""Load official checkpoint files into a model built on the meta device.

Supported layouts (first match wins): ``model.safetensors.index.json``,
``model.safetensors``, ``pytorch_model.bin.index.json``, ``pytorch_model.bin``.
Tensors are read one shard at a time (``.bin`` memory-mapped, safetensors one
tensor at a time), converted to the compute dtype on the target device and
assigned in place of the meta parameters, so loading never holds two full copies
of the weights. Int4 GPTQ checkpoints load the same way once ``qwen_vl.quant.loading``
has put ``QuantLinear`` layers where their files hold ``qweight`` tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not match the model."""


def weight_files(ckpt_dir: str | Path) -> list[Path]:
    """The weight files of ``ckpt_dir`` in load order."""
    ckpt_dir = Path(ckpt_dir)
    for name, is_index in WEIGHT_LAYOUTS:
        path = ckpt_dir / name
        if not path.is_file():
            continue
        if not is_index:
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid weight index ({e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (ckpt_dir / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard files missing from {ckpt_dir}: {', '.join(missing)}")
        return [ckpt_dir / s for s in shards]
    expected = ", ".join(name for name, _ in WEIGHT_LAYOUTS)
    raise CheckpointError(f"{ckpt_dir}: no weights found (expected one of: {expected})")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, on CPU, without reading it whole."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    try:
        yield from state.items()
    finally:
        del state


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    else:
        module._buffers[attr] = value


def _keeps_checkpoint_dtype(model: nn.Module, name: str) -> bool:
    """Whether the module holding ``name`` asks for the file's dtype (``keeps_checkpoint_dtype``),
    as the float16 scales of a GPTQ layer do."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return attr in getattr(module, "keeps_checkpoint_dtype", ())


def load_weights(
    model: nn.Module,
    ckpt_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    tied: dict[str, str] | None = None,
) -> None:
    """Fill ``model`` (built on the meta device) from the files of ``ckpt_dir``.

    ``tied`` maps a parameter name to the one it shares storage with (for example
    ``lm_head.weight`` → ``transformer.wte.weight``); a tied name may be absent
    from the files. Floating-point tensors become ``dtype`` on ``device``, except
    those a module keeps in the file's dtype (``keeps_checkpoint_dtype``).

    Raises CheckpointError listing every missing key, unexpected key and shape
    mismatch.
    """
    tied = tied or {}
    expected = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    mismatched_names: set[str] = set()
    for path in weight_files(ckpt_dir):
        for name, tensor in iter_tensors(path):
            if name in tied:
                continue
            if name not in expected:
                unexpected.append(f"{name} ({path.name})")
                continue
            if tuple(tensor.shape) != tuple(expected[name]):
                mismatched.append(
                    f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name])} ({path.name})"
                )
                mismatched_names.add(name)
                continue
            keep = not tensor.is_floating_point() or _keeps_checkpoint_dtype(model, name)
            target_dtype = tensor.dtype if keep else dtype
            _set_tensor(model, name, tensor.to(device=device, dtype=target_dtype))
            loaded.add(name)
    missing = sorted(set(expected) - loaded - set(tied) - mismatched_names)
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {ckpt_dir} does not match the model:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise CheckpointError("\n  ".join(parts))
    for name, source in tied.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._parameters[attr] = model.get_parameter(source)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"tensors left without values after loading {ckpt_dir}: {', '.join(still_meta)}")
