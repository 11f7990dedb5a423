"""Training checkpoints: save, find, load and rotate ``out_dir/checkpoint-{step}/``.

A checkpoint directory holds::

    model.safetensors    the weights given (full model or adapter only)
    optimizer.pt         optimizer.state_dict()          (when an optimizer is given)
    scheduler.pt         scheduler.state_dict()          (when a scheduler is given)
    rng_state.pt         python, numpy, torch CPU and CUDA generator states, one entry per rank
    train_state.json     TrainState: step, epoch, batch position, tokens seen, sampler seed
    complete             manifest {"step", "files": {name: bytes}}, written last
    ...                  extra files given by the caller

Commit protocol: everything is written into ``out_dir/.checkpoint-{step}.tmp-XXXX``,
each file is fsynced, the ``complete`` manifest is written and fsynced last, and the
directory is renamed to ``checkpoint-{step}``. The rename is the commit: a process
killed at any moment leaves either no ``checkpoint-{step}`` or a whole one. The
manifest is a second guard for directories copied or pruned by other tools: a
``checkpoint-*`` directory without it, or whose files differ from it, is never
picked by :func:`latest_checkpoint` and is refused by :func:`load_training_checkpoint`.
Old checkpoints are removed by renaming them to a hidden name first, so a
half-deleted one is never visible either. Hidden leftovers are removed on the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
STALE_RE = re.compile(r"\.checkpoint-\d+\.(tmp|old)-.+")
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng_state.pt"
TRAIN_STATE = "train_state.json"
MARKER = "complete"
RESERVED = {WEIGHTS, OPTIMIZER, SCHEDULER, RNG, TRAIN_STATE, MARKER}


class TrainingCheckpointError(RuntimeError):
    """A training checkpoint is missing, incomplete or unreadable; the message names the file."""


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()`` (optimizers, schedulers, wrappers)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class TrainState:
    """Where training stands; enough, with the sampler seed, to continue the data order exactly.

    ``global_step`` counts optimizer steps; ``batch_in_epoch`` counts the (micro-)batches of
    epoch ``epoch`` already consumed (skip that many on resume).
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    sampler_seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "train_state.json") -> TrainState:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        missing = sorted(names - data.keys())
        if missing:
            raise TrainingCheckpointError(f"{source}: missing fields {', '.join(missing)}")
        bad = [n for n in names if not isinstance(data[n], int) or isinstance(data[n], bool)]
        if bad:
            raise TrainingCheckpointError(f"{source}: fields {', '.join(sorted(bad))} must be integers")
        return cls(**{n: data[n] for n in names})


# ---------------------------------------------------------------- random number generators


def capture_rng_state() -> dict[str, Any]:
    """The states of python ``random``, numpy's global generator, torch CPU and every CUDA device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every generator captured by :func:`capture_rng_state` back to ``state``."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(state['cuda'])} devices, "
                f"this process sees {torch.cuda.device_count()}; CUDA RNG states not restored",
                stacklevel=2,
            )
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """RNG states of every rank, in rank order (a collective: call it on every rank).

    Outside ``torch.distributed`` this is ``[capture_rng_state()]``.
    """
    local = capture_rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, local)
    return states


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---------------------------------------------------------------- finding checkpoints


def _step_of(path: Path) -> int | None:
    match = CHECKPOINT_RE.fullmatch(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-*`` directories in ``out_dir`` (with their ``complete`` manifest), by step."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(step, p) for p in out_dir.iterdir() if (step := _step_of(p)) is not None and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``out_dir``, or ``None``."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _weights_for_safetensors(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; a tensor sharing storage with an earlier one is copied."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model_state.items():
        t = tensor.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t.contiguous()
        seen.add(ptr)
    return out


def _write_extra(tmp: Path, name: str, content: bytes | str | Path) -> None:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.parts[0] in RESERVED:
        raise ValueError(f"extra file name {name!r} must be a relative path inside the checkpoint, not {RESERVED}")
    dest = tmp / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        dest.write_bytes(content)
    elif Path(content).is_dir():
        shutil.copytree(content, dest)
    elif Path(content).is_file():
        shutil.copyfile(content, dest)
    else:
        raise FileNotFoundError(f"extra file {name!r}: {content} does not exist")


def _remove_dir(path: Path) -> None:
    """Hide ``path`` under a stale name (atomic), then delete it."""
    hidden = path.parent / f".{path.name}.old-{os.getpid()}-{random.SystemRandom().getrandbits(32):08x}"
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def clean_stale(out_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted saves or deletions (``.checkpoint-*.tmp-*`` / ``.old-*``)."""
    out_dir = Path(out_dir)
    stale = [p for p in out_dir.iterdir() if STALE_RE.fullmatch(p.name)] if out_dir.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def rotate_checkpoints(out_dir: str | Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the ``keep_last`` highest steps, never ``keep``.

    Directories without a ``complete`` manifest are neither counted nor deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = list_checkpoints(out_dir)
    doomed = [p for p in found[: max(0, len(found) - keep_last)] if keep is None or p.resolve() != keep.resolve()]
    for path in doomed:
        _remove_dir(path)
    return doomed


def _write_contents(
    tmp: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer: Stateful | None,
    scheduler: Stateful | None,
    train_state: TrainState,
    rng_states: list[dict[str, Any]],
    extra_files: dict[str, bytes | str | Path],
) -> None:
    from safetensors.torch import save_file

    save_file(_weights_for_safetensors(model_state), str(tmp / WEIGHTS), metadata={"format": "pt", "step": str(step)})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER)
    torch.save(rng_states, tmp / RNG)
    (tmp / TRAIN_STATE).write_text(train_state.to_json(), encoding="utf-8")
    for name, content in extra_files.items():
        _write_extra(tmp, name, content)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:
        _fsync_path(path)
    manifest = {"step": step, "files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in files}}
    (tmp / MARKER).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    _fsync_path(tmp / MARKER)
    for directory in {tmp, *(p.parent for p in files)}:
        _fsync_path(directory)


def save_training_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: Stateful | None,
    scheduler: Stateful | None,
    train_state: TrainState,
    extra_files: dict[str, bytes | str | Path] | None = None,
    keep_last: int | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    is_main_process: bool | None = None,
) -> Path | None:
    """Write ``out_dir/checkpoint-{step}/`` atomically, then keep only the last ``keep_last``.

    ``model_state`` is written as given (full weights or an adapter's). ``rng_states`` is
    one state per rank from :func:`gather_rng_states` (default: this process's only).
    Only the main process writes (default: rank 0, or the only process); the others
    return ``None`` at once, so gather the RNG states (a collective) before calling,
    and place a barrier after it if other ranks read the checkpoint. A checkpoint of the
    same step already there is replaced (a kill during that swap can lose the old copy of
    this step, never an earlier checkpoint). Returns the checkpoint directory.
    """
    if is_main_process is None:
        is_main_process = _rank() == 0
    if not is_main_process:
        return None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-", dir=out_dir))
    try:
        _write_contents(
            tmp,
            step,
            model_state,
            optimizer,
            scheduler,
            train_state,
            rng_states if rng_states is not None else [capture_rng_state()],
            extra_files or {},
        )
        if final.exists():
            _remove_dir(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(out_dir)
    if keep_last is not None:
        rotate_checkpoints(out_dir, keep_last, keep=final)
    return final


# ---------------------------------------------------------------- reading


def _check_manifest(path: Path) -> None:
    marker = path / MARKER
    if not marker.is_file():
        raise TrainingCheckpointError(f"{marker}: missing; {path} is incomplete (an interrupted save or deletion)")
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise TrainingCheckpointError(f"{marker}: unreadable manifest ({e})") from e
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise TrainingCheckpointError(f"{file}: listed in {marker} but missing")
        if file.stat().st_size != size:
            raise TrainingCheckpointError(f"{file}: {file.stat().st_size} bytes, {marker} lists {size}")


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingCheckpointError(f"{file}: cannot be read ({type(e).__name__}: {e})") from e


def _load_into(target: Stateful, file: Path) -> None:
    if not file.is_file():
        raise TrainingCheckpointError(f"{file}: missing (the checkpoint was saved without it)")
    state = _torch_load(file)
    try:
        target.load_state_dict(state)
    except Exception as e:
        raise TrainingCheckpointError(f"{file}: does not fit {type(target).__name__} ({e})") from e


def load_training_checkpoint(
    path: str | Path,
    *,
    optimizer: Stateful | None,
    scheduler: Stateful | None,
    rank: int | None = None,
    restore_rng: bool = True,
) -> tuple[dict[str, torch.Tensor], TrainState]:
    """Read a checkpoint written by :func:`save_training_checkpoint`.

    Loads the optimizer and scheduler states into the objects given (build them first,
    over the model's parameters, then call this), restores the RNG states saved for
    ``rank`` (default: this process's rank) last, and returns the CPU weights (for
    ``model.load_state_dict`` or peft's ``set_peft_model_state_dict``) and the TrainState.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise TrainingCheckpointError(f"{path}: not a checkpoint directory")
    _check_manifest(path)
    try:
        model_state = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainingCheckpointError(f"{path / WEIGHTS}: cannot be read ({e})") from e
    try:
        train_state = TrainState.from_json((path / TRAIN_STATE).read_text(encoding="utf-8"), str(path / TRAIN_STATE))
    except (ValueError, OSError) as e:
        raise TrainingCheckpointError(f"{path / TRAIN_STATE}: cannot be read ({e})") from e
    if optimizer is not None:
        _load_into(optimizer, path / OPTIMIZER)
    if scheduler is not None:
        _load_into(scheduler, path / SCHEDULER)
    if restore_rng:
        states = _torch_load(path / RNG)
        rank = _rank() if rank is None else rank
        if rank < len(states):
            restore_rng_state(states[rank])
        else:
            warnings.warn(
                f"{path / RNG} holds RNG states for {len(states)} ranks; rank {rank} keeps its own",
                stacklevel=2,
            )
    return model_state, train_state
