"""Run one task on one model: batched generation through the engine (or option
likelihoods), predictions appended as they come, torchrun sharding, scoring.

Layout of ``out``: ``<task>/predictions.rank{r}.jsonl`` (appended while running),
``<task>/predictions.jsonl`` (every item, the task's order), ``<task>/metrics.json``,
``<task>/run.json`` (what was run), and ``summary.md`` / ``summary.json`` over every
task evaluated into ``out``. A killed run started again with the same options
skips the items it has answered; under torchrun each process answers the items
``rank::world_size`` and the first process scores them, with the same result as
one process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from ..chat import DEFAULT_SYSTEM
from ..chat_format import get_stop_words_ids, make_context
from ..engine.engine import Engine
from ..engine.image_cache import ImageFeatureCache
from ..engine.request import GenerationRequest
from ..finetune.distributed import barrier, init_processes
from ..images import ImagePolicy
from ..model.saving import atomic_write
from .likelihood import option_losses
from .metrics.choice import select_by_loss
from .predictions import PredictionWriter, read_done, write_merged
from .progress import EvalProgress
from .registry import get_task
from .summary import write_summary
from .tasks.base import EvalItem, Task

STYLES = ("auto", "base", "chat")
#: Options whose change makes earlier predictions unusable for a resumed run.
GENERATION_KEYS = ("task", "data", "model", "style", "max_new_tokens", "system", "limit")


@dataclass
class EvalSettings:
    """Options of ``qwen-vl eval``. ``style="auto"`` prompts a chat model (its
    generation config says ``chat_format: chatml``) in chat style and a base model
    with the paper's base prompts; ``mode`` chooses the scorer: ``"canonical"`` or
    ``"qwen"`` (Qwen-VL's own scripts)."""

    task: str
    data: str | Path
    model: str | Path
    out: str | Path
    image_root: str | Path | None = None
    style: str = "auto"
    mode: str = "canonical"
    batch_size: int = 8
    max_new_tokens: int | None = None
    limit: int | None = None
    skip_bad: bool = False
    device: str = "auto"
    dtype: str | None = None
    system: str = DEFAULT_SYSTEM
    restart: bool = False

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"--style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.mode not in ("canonical", "qwen"):
            raise ValueError(f"--mode must be canonical or qwen, got {self.mode!r}")
        for name in ("batch_size", "max_new_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, Any]
    items: int
    skipped_bad: int
    out_dir: Path
    predictions: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate(
    settings: EvalSettings, model=None, tokenizer=None, *, quiet: bool = False, stream: TextIO | None = None
) -> EvalResult:
    """Run ``settings.task``; ``model`` / ``tokenizer`` may be given already loaded."""
    proc = init_processes(settings.device)
    task = get_task(settings.task)
    read = task.read(
        Path(settings.data), Path(settings.image_root) if settings.image_root else None, skip_bad=settings.skip_bad
    )
    items = read.items[: settings.limit] if settings.limit else read.items
    if not items:
        raise ValueError(f"{settings.data}: no usable items for task {settings.task}")
    out_dir = Path(settings.out) / task.name
    if tokenizer is None:
        from ..tokenizer import QWenTokenizer

        tokenizer = QWenTokenizer.from_pretrained(settings.model)
    if model is None:
        model = _load_model(settings, proc.device)
    style = _style(settings.style, model)
    run_info = _run_info(settings, task, style)
    done = _previous(out_dir, run_info, settings.restart, proc.is_main)
    barrier()
    mine = [item for item in items[proc.rank :: proc.world_size] if item.id not in done]
    progress = EvalProgress(len(mine), stream, quiet or not proc.is_main)
    writer = PredictionWriter(out_dir, proc.rank)
    caller_policy = model.image_policy  # the caller's model gets its own policy back
    try:
        model.image_policy = _policy_for(items, settings.image_root)
        if task.likelihood:
            _score_options(task, model, tokenizer, mine, style, settings.system, writer, progress)
        else:
            _generate(task, model, tokenizer, mine, style, settings, writer, progress)
    finally:
        model.image_policy = caller_policy
        writer.close()
        progress.close()
    barrier()
    if not proc.is_main:
        return EvalResult(task.name, {}, len(items), len(read.errors), out_dir)
    return _finish(task, items, read.errors, settings, style, out_dir, run_info)


# ----- setup -------------------------------------------------------------------------
def _load_model(settings: EvalSettings, device: torch.device):
    from ..modeling import QWenLMHeadModel

    dtype = settings.dtype or ("float32" if device.type == "cpu" else "auto")
    return QWenLMHeadModel.from_pretrained(settings.model, dtype=dtype, device=device)


def _style(style: str, model) -> str:
    if style != "auto":
        return style
    return "chat" if getattr(model.generation_config, "chat_format", "chatml") == "chatml" else "base"


def _run_info(settings: EvalSettings, task: Task, style: str) -> dict[str, Any]:
    return {
        "task": task.name,
        "data": str(Path(settings.data).resolve()),
        "model": str(Path(settings.model).resolve()),
        "style": style,
        "max_new_tokens": settings.max_new_tokens or task.max_new_tokens,
        "system": settings.system,
        "limit": settings.limit,
    }


def _previous(out_dir: Path, run_info: dict[str, Any], restart: bool, is_main: bool) -> dict[str, dict[str, Any]]:
    """Predictions of an earlier run of the same options (resume), after checking that they match."""
    info_path = out_dir / "run.json"
    if restart and is_main:
        for path in out_dir.glob("predictions*.jsonl"):
            path.unlink()
    elif info_path.is_file():
        earlier = json.loads(info_path.read_text(encoding="utf-8"))
        changed = [k for k in GENERATION_KEYS if earlier.get(k) != run_info.get(k)]
        if changed and any(out_dir.glob("predictions.rank*.jsonl")):
            key = changed[0]
            raise ValueError(
                f"{out_dir} holds predictions of a run with another {key} ({earlier.get(key)!r}, now "
                f"{run_info.get(key)!r}): choose another --out or pass --restart"
            )
    if is_main:
        text = json.dumps(run_info, indent=2, ensure_ascii=False) + "\n"
        atomic_write(info_path, lambda p: p.write_text(text, encoding="utf-8"))
    return {} if restart else read_done(out_dir)


def _policy_for(items: list[EvalItem], image_root: str | Path | None) -> ImagePolicy:
    """Image files may come from the image root, or else the folder holding every item's images."""
    if image_root is not None:
        return ImagePolicy(allowed_roots=(str(Path(image_root).resolve()),))
    paths = [p for item in items for p in item.images]
    root = os.path.commonpath([str(Path(p).resolve().parent) for p in paths]) if paths else os.getcwd()
    return ImagePolicy(allowed_roots=(root,))


def _context(task: Task, tokenizer, item: EvalItem, style: str, system: str) -> list[int]:
    prompt = task.prompt(item, style)
    if style == "chat":
        return make_context(tokenizer, prompt, history=None, system=system, max_window_size=1 << 30)[1]
    return tokenizer.encode(prompt)


# ----- answering --------------------------------------------------------------------
def _generate(task, model, tokenizer, items, style, settings, writer, progress) -> None:
    """Greedy answers through the engine, written as they finish."""
    if not items:
        return
    max_new = settings.max_new_tokens or task.max_new_tokens
    prompts = {item.id: _context(task, tokenizer, item, style, settings.system) for item in items}
    longest = max(map(len, prompts.values()))
    limit = model.config.max_position_embeddings
    engine = Engine(
        model, tokenizer, max_batch_size=settings.batch_size, max_seq_len=min(longest + max_new + 1, limit)
    )  # fmt: skip
    stops = get_stop_words_ids("chatml", tokenizer) if style == "chat" else []
    queue = deque(items)
    running: dict[str, tuple[EvalItem, Any]] = {}
    while queue or running:
        while queue and len(running) < 4 * settings.batch_size:
            item = queue.popleft()
            request = GenerationRequest(
                prompt_ids=prompts[item.id], max_new_tokens=max_new, stop_words_ids=stops,
                eos_token_ids=[tokenizer.eod_id], request_id=item.id,
            )  # fmt: skip
            running[item.id] = (item, engine.submit(request))
        engine.step()
        for item_id in [i for i, (_, h) in running.items() if h.finished]:
            item, handle = running.pop(item_id)
            if handle.finish_reason == "error":
                raise RuntimeError(f"{item.source or item.id}: generation failed: {handle.error}")
            response = handle.text
            writer.write(
                {
                    "id": item.id,
                    "response": response,
                    "prediction": task.postprocess(response, item),
                    "prompt_tokens": len(prompts[item.id]),
                    "finish_reason": handle.finish_reason,
                }
            )
            progress.advance()


def _score_options(task, model, tokenizer, items, style, system, writer, progress) -> None:
    """Likelihood tasks: each option's average loss; the lowest wins."""
    if model.image_cache is None:
        model.image_cache = ImageFeatureCache(16)
    for item in items:
        context = _context(task, tokenizer, item, style, system)
        options = [tokenizer.encode(text) for text in task.option_texts(item, style)]
        losses = option_losses(model, context, options, [])
        writer.write({"id": item.id, "option_losses": losses, "prediction": select_by_loss(losses)})
        progress.advance()


# ----- scoring ----------------------------------------------------------------------
def _finish(task, items, bad, settings, style, out_dir, run_info) -> EvalResult:
    done = read_done(out_dir)
    missing = [item.id for item in items if item.id not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} items have no prediction (first: {missing[0]}); run again to finish them")
    rows = [done[item.id] for item in items]
    predictions = write_merged(out_dir, rows)
    metrics = task.score(items, [r["prediction"] for r in rows], mode=settings.mode)
    record = {
        **run_info,
        "family": task.family,
        "metric": task.metric,
        "mode": settings.mode,
        "items": len(items),
        "skipped_bad": len(bad),
        "metrics": metrics,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out_dir / "metrics.json", lambda p: p.write_text(text, encoding="utf-8"))
    write_summary(Path(settings.out))
    return EvalResult(task.name, metrics, len(items), len(bad), out_dir, predictions, {"style": style})
