"""Write a model in the official on-disk layout: ``config.json`` plus weights as
``model.safetensors`` or ``pytorch_model.bin``, sharded with an index when large.

Every file is written under a temporary name and renamed into place, and the
index is written last, so an interrupted save never leaves a half-written file
under a name a loader would read.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


@functools.cache
def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then rename the result to ``path`` (with a new file's usual mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    safe_serialization: bool = True,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Save ``model.config`` and the weights of ``model`` to ``out_dir``.

    Tied parameters are written once (under their first name). ``dtype`` converts
    floating-point tensors (default: as they are). Returns the weight files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = id(tensor.untyped_storage()) if tensor.device.type != "meta" else id(tensor)
        if getattr(model.config, "tie_word_embeddings", False) and key in seen:
            continue
        seen.add(key)
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.contiguous()
    config_json = model.config.to_json_string()
    atomic_write(out_dir / "config.json", lambda p: p.write_text(config_json, encoding="utf-8"))

    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    shards = _shard(state, max_shard_bytes)
    names = (
        [f"{stem}.{ext}"]
        if len(shards) == 1
        else [f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}" for i in range(1, len(shards) + 1)]
    )
    written = []
    for name, shard in zip(names, shards):
        if safe_serialization:
            from safetensors.torch import save_file

            atomic_write(out_dir / name, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
        else:
            atomic_write(out_dir / name, lambda p, s=shard: torch.save(s, p))
        written.append(out_dir / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: n for n, s in zip(names, shards) for k in s},
        }
        text = json.dumps(index, indent=2, sort_keys=True)
        atomic_write(out_dir / f"{stem}.{ext}.index.json", lambda p: p.write_text(text, encoding="utf-8"))
    return written
