"""Pre-training of the vision tower on shapes-world pictures with per-cell labels.

A vision tower trained from scratch through the language model alone learns slowly: at
first the answers do not depend on the picture, so training mostly learns to ignore it.
Here the tower (ViT + resampler + output projection) learns first to say, at each of its
output features, which colour and shape is there, the box of that object and the letters
written there (``qwen_vl.data.dense_targets``), through small linear heads that are
dropped afterwards. The language model is untouched; the result is a whole checkpoint in
the official layout whose ``transformer.visual`` weights are the trained ones.

The run is resumable: ``state.pt`` in the output folder (written atomically every
``save_steps``) holds the tower, heads, optimizer, schedule and step, and a rerun with the
same settings continues from it and draws the same batches.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dense_targets import (
    CHAR_CLASSES,
    COLOUR_CLASSES,
    COUNT_CLASSES,
    COUNTS,
    SHAPE_CLASSES,
    CellTargets,
    cell_targets,
)
from ..data.scenes import Scene
from ..images import ImagePolicy, image_transform, load_image
from ..model.saving import atomic_write
from ..modeling import QWenLMHeadModel
from .merge import DEFAULT_MAX_SHARD_SIZE, parse_size, write_model_directory
from .progress import TrainingProgress
from .schedule import make_scheduler

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
FINAL_DIR = "final"


@dataclass
class VisionPretrainSettings:
    """What ``pretrain_vision`` reads, trains and writes."""

    model: str  # checkpoint to start from (its LLM is copied unchanged)
    data: Sequence[str]  # shapes-world folders (``qwen-vl synth`` output: truth.jsonl + images/)
    output_dir: str
    eval_data: str | None = None  # a held-out folder, scored at every save
    eval_pictures: int = 256
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 5e-4  # the tower's
    head_learning_rate: float = 1e-2
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    box_weight: float = 10.0  # box L1 about as large as the three cross-entropies (at 2: no positions learnt)
    char_samples: int = 4
    seed: int = 0
    save_steps: int = 100
    threads: int | None = None


class CellHeads(nn.Module):
    """Linear read-outs of every output feature (B, G*G, D): colour, shape, box, letters, counts."""

    def __init__(self, dim: int, char_samples: int) -> None:
        super().__init__()
        self.char_samples = char_samples
        self.colour = nn.Linear(dim, COLOUR_CLASSES)
        self.shape = nn.Linear(dim, SHAPE_CLASSES)
        self.box = nn.Linear(dim, 4)
        self.chars = nn.Linear(dim, char_samples * CHAR_CLASSES)
        self.count = nn.Linear(dim, len(COUNTS) * COUNT_CLASSES)

    def forward(self, features: torch.Tensor) -> CellTargets:
        B, Q, _ = features.shape
        g = math.isqrt(Q)
        f = features.view(B, g, g, -1)
        chars = self.chars(f).view(B, g, g, self.char_samples, CHAR_CLASSES)
        count = self.count(f).view(B, g, g, len(COUNTS), COUNT_CLASSES)
        return CellTargets(self.colour(f), self.shape(f), self.box(f).sigmoid(), chars, count)


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (logits (..., C), labels (...)) averaged over the labelled places (label > 0)
    plus averaged over the empty ones (label 0): the few cells with an object or a letter weigh
    as much as the many without, which a plain mean would let the tower ignore."""
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
    labelled = labels.flatten() > 0
    return sum(ce[where].mean() for where in (labelled, ~labelled) if where.any())


def cell_losses(pred: CellTargets, truth: CellTargets) -> dict[str, torch.Tensor]:
    """Balanced cross-entropy of colour, shape and letters; mean L1 of boxes over object cells;
    cross-entropy of the counts (the picture's at every cell, the same-colour and same-shape
    ones at object cells)."""
    on_object = truth.colour > 0
    box = (pred.box - truth.box).abs().mean(-1)[on_object]
    count = F.cross_entropy(pred.count.flatten(0, -2), truth.count.flatten(), reduction="none").view(truth.count.shape)
    same = count[..., 1:][on_object]
    return {
        "colour": balanced_cross_entropy(pred.colour, truth.colour),
        "shape": balanced_cross_entropy(pred.shape, truth.shape),
        "box": box.mean() if box.numel() else pred.box.sum() * 0.0,
        "chars": balanced_cross_entropy(pred.chars, truth.chars),
        "count": count[..., 0].mean() + (same.mean() if same.numel() else 0.0),
    }


@torch.no_grad()
def cell_scores(pred: CellTargets, truth: CellTargets) -> dict[str, float]:
    """Accuracies on object cells (colour, shape), on letter samples (chars), on the cells and
    samples with nothing there (empty, no_letter: told apart from objects and letters), and the
    mean box edge error in the 0-1000 space; counts: the share of object cells with all three right."""
    on_object, on_letter = truth.colour > 0, truth.chars > 0

    def share(hit: torch.Tensor, where: torch.Tensor) -> float:
        return float(hit[where].float().mean()) if where.any() else float("nan")

    return {
        "colour_acc": share(pred.colour.argmax(-1) == truth.colour, on_object),
        "shape_acc": share(pred.shape.argmax(-1) == truth.shape, on_object),
        "char_acc": share(pred.chars.argmax(-1) == truth.chars, on_letter),
        "empty_acc": share(pred.colour.argmax(-1) == 0, ~on_object),
        "no_letter_acc": share(pred.chars.argmax(-1) == 0, ~on_letter),
        "count_acc": share((pred.count.argmax(-1) == truth.count).all(-1), on_object),
        "box_error_1000": 1000 * float((pred.box - truth.box).abs().mean(-1)[on_object].mean())
        if on_object.any()
        else float("nan"),
    }


def read_pictures(folders: Sequence[str | Path]) -> list[tuple[Path, Scene]]:
    """Every picture of the shapes-world folders with its scene, in file order."""
    out: list[tuple[Path, Scene]] = []
    for folder in map(Path, folders):
        truth = folder / "truth.jsonl"
        if not truth.is_file():
            raise FileNotFoundError(f"{folder}: no truth.jsonl (make the folder with `qwen-vl synth`)")
        with truth.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    pairs = list(zip(record["images"], record["scenes"], strict=True))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{truth}:{number}: not a shapes-world record ({exc})") from None
                out.extend((folder / image, Scene.from_json(scene)) for image, scene in pairs)
    if not out:
        raise ValueError(f"no pictures in {', '.join(map(str, folders))}")
    return out


class PictureBatches:
    """Pixels (B, 3, S, S) and stacked cell labels of pictures drawn by a seeded generator;
    batch ``k`` is the same whenever it is drawn."""

    def __init__(self, pictures: list[tuple[Path, Scene]], image_size: int, grid: int, samples: int, seed: int) -> None:
        self.pictures, self.image_size, self.grid, self.samples, self.seed = pictures, image_size, grid, samples, seed
        roots = {str(p.parent.parent.resolve()) for p, _ in pictures}
        self.policy = ImagePolicy(allowed_roots=tuple(sorted(roots)))

    def take(self, indices: Sequence[int]) -> tuple[torch.Tensor, CellTargets]:
        pixels, labels = [], []
        for i in indices:
            path, scene = self.pictures[i]
            pixels.append(image_transform(load_image(path, self.policy), self.image_size))
            labels.append(cell_targets(scene, self.grid, self.samples))
        return torch.stack(pixels), CellTargets.join(labels)

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, CellTargets]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.take(torch.randint(0, len(self.pictures), (size,), generator=g).tolist())


def evaluate(visual: nn.Module, heads: CellHeads, batches: PictureBatches, count: int) -> dict[str, float]:
    """Cell scores of the first ``count`` pictures of ``batches``."""
    was_training = visual.training
    visual.eval()
    preds, truths = [], []
    with torch.no_grad():
        for start in range(0, min(count, len(batches.pictures)), 32):
            pixels, truth = batches.take(range(start, min(start + 32, count, len(batches.pictures))))
            preds.append(heads(visual(pixels)))
            truths.append(truth)
    visual.train(was_training)
    return cell_scores(CellTargets.join(preds, torch.cat), CellTargets.join(truths, torch.cat))


def pretrain_vision(s: VisionPretrainSettings, *, stream: TextIO | None = None, quiet: bool = False) -> Path:
    """Train the vision tower of ``s.model`` on per-cell labels; returns the final checkpoint folder."""
    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model = QWenLMHeadModel.from_pretrained(s.model, dtype=torch.float32)
    visual = model.transformer.visual.train()
    grid = math.isqrt(visual.n_queries)
    heads = CellHeads(visual.output_dim, s.char_samples)
    train = PictureBatches(read_pictures(s.data), visual.image_size, grid, s.char_samples, s.seed)
    held = (
        PictureBatches(read_pictures([s.eval_data]), visual.image_size, grid, s.char_samples, 0)
        if s.eval_data
        else None
    )
    tower = [p for n, p in visual.named_parameters() if p.requires_grad and n != "attn_pool.pos_embed"]
    optimizer = torch.optim.AdamW(
        [{"params": tower, "lr": s.learning_rate}, {"params": list(heads.parameters()), "lr": s.head_learning_rate}],
        weight_decay=s.weight_decay,
    )
    scheduler = make_scheduler(optimizer, "cosine", total_steps=s.steps, warmup_steps=min(s.warmup_steps, s.steps))
    step = 0
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["settings"] != _fingerprint(s):
            raise ValueError(f"{state_path} was written with other settings; use another --output-dir")
        visual.load_state_dict(state["visual"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    progress = TrainingProgress(s.steps, stream, quiet, start_step=step, unit="pictures/s")
    params = tower + list(heads.parameters())
    seen_start, started = step, time.monotonic()
    # the next batch's pictures are opened and resized in a thread while this one trains
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pictures")
    try:
        upcoming = reader.submit(train.batch, step, s.batch_size)
        while step < s.steps:
            pixels, truth = upcoming.result()
            if step + 1 < s.steps:
                upcoming = reader.submit(train.batch, step + 1, s.batch_size)
            losses = cell_losses(heads(visual(pixels)), truth)
            loss = losses["colour"] + losses["shape"] + losses["chars"] + losses["count"] + s.box_weight * losses["box"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            rate = (step - seen_start) * s.batch_size / max(time.monotonic() - started, 1e-9)
            progress.update(step, float(loss.detach()), scheduler.get_last_lr()[0], rate)
            if step % s.save_steps == 0 or step == s.steps:
                row = {"step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
                if held is not None:
                    row.update(
                        {f"heldout_{k}": round(v, 4) for k, v in evaluate(visual, heads, held, s.eval_pictures).items()}
                    )
                _save_state(state_path, s, visual, heads, optimizer, scheduler, step)
                with (out / LOG_FILE).open("a", encoding="utf-8") as log:
                    log.write(json.dumps(row) + "\n")
    finally:
        reader.shutdown(cancel_futures=True)
        progress.close()
    final = out / FINAL_DIR
    write_model_directory(
        model, Path(s.model), final, max_shard_bytes=parse_size(DEFAULT_MAX_SHARD_SIZE), overwrite=True
    )
    return final


def _fingerprint(s: VisionPretrainSettings) -> dict[str, object]:
    """The settings that must match for a resumed run to continue the same one."""
    keep = (
        "model",
        "data",
        "steps",
        "batch_size",
        "learning_rate",
        "head_learning_rate",
        "warmup_steps",
        "weight_decay",
        "box_weight",
        "char_samples",
        "seed",
    )
    d = asdict(s)
    # what the heads read out: a state from code with other targets cannot be continued
    return {k: list(d[k]) if k == "data" else d[k] for k in keep} | {"targets": [f.name for f in fields(CellTargets)]}


def _save_state(path: Path, s, visual, heads, optimizer, scheduler, step: int) -> None:
    state = {
        "settings": _fingerprint(s),
        "visual": visual.state_dict(),
        "heads": heads.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))
