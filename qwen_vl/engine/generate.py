"""``model.generate`` in the transformers style (a tensor of prompts in, prompts +
new tokens out), run as one batch of requests on the ``Engine``.

Each row uses only its real tokens (whatever the padding side), counts positions
from its own first token and samples with its own seed, so a row of a batch
generates exactly what it generates alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..model.image_spans import find_image_spans
from .request import GenerationRequest
from .sampling import SamplingParams

#: ``generate`` keywords read into the generation config.
GENERATION_FIELDS = {
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "max_new_tokens",
    "max_length",
    "eos_token_id",
    "pad_token_id",
    "stop_words_ids",
    "chat_format",
    "max_window_size",
}
#: Keywords of the transformers API that change nothing here.
IGNORED_FIELDS = {"return_dict_in_generate", "use_cache", "output_scores", "logits_processor", "num_beams"}


def as_id_list(value: int | Sequence[int] | None) -> list[int]:
    """An id setting that may be None, one int or several, as a list."""
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def window_size(gc) -> int:
    """Tokens of history a chat turn may keep: ``gc.max_window_size``, 6,144 when unset."""
    return int(getattr(gc, "max_window_size", None) or 6144)


def eos_token_ids(gc, tokenizer) -> list[int]:
    """The ids that end generation: ``gc.eos_token_id``, else the tokenizer's ``<|endoftext|>``."""
    return as_id_list(getattr(gc, "eos_token_id", None)) or [tokenizer.eod_id]


def resolve_generation_config(model, generation_config=None, **kwargs: Any):
    """A copy of ``generation_config`` (default: the model's) with ``kwargs`` applied."""
    unknown = set(kwargs) - GENERATION_FIELDS - IGNORED_FIELDS
    if unknown:
        raise TypeError(f"generate got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if kwargs.get("num_beams", 1) not in (None, 1):
        raise ValueError("num_beams > 1 is not supported: use do_sample=False for greedy decoding")
    if kwargs.get("logits_processor"):
        raise ValueError("custom logits_processor objects are not supported; use stop_words_ids and sampling options")
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    for name in GENERATION_FIELDS & set(kwargs):
        setattr(gc, name, kwargs[name])
    return gc


def _row_images(model, rows: list[list[int]], images: Any) -> list[Any]:
    """Split a batch-level ``images`` argument (span order over the whole batch, or a
    mapping) into one entry per row."""
    if images is None or isinstance(images, Mapping):
        return [images] * len(rows)
    cfg = model.config
    counts = [len(find_image_spans(torch.tensor([r]), cfg.image_start_id, cfg.num_image_queries)) for r in rows]
    if sum(counts) != len(images):
        raise ValueError(f"{len(images)} images given for {sum(counts)} <img> spans in the prompts")
    out, start = [], 0
    for n in counts:
        out.append(list(images[start : start + n]) if n else None)
        start += n
    return out


def generate_stream(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config=None,
    images: Sequence[Any] | Mapping[str, Any] | None = None,
    seed: int | Sequence[int | None] | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) at each step.

    The rows run as requests of one ``Engine``: each row uses only its real tokens
    (``attention_mask``; padding on either side), its own seed, the shared
    generation settings. Rows that finished yield the pad id. Stops when every
    row finished or after ``max_new_tokens`` steps.
    """
    from .engine import Engine

    gc = resolve_generation_config(model, generation_config, **kwargs)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    eos_ids = as_id_list(gc.eos_token_id)
    pad_id = gc.pad_token_id if gc.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None else max((gc.max_length or 20) - T, 0)
    limit = model.config.max_position_embeddings
    if T >= limit:
        raise ValueError(f"prompt of {T} tokens leaves no room: the model handles {limit} positions")
    max_new = min(int(max_new), limit - T)
    if max_new <= 0:
        return
    stop_words = [list(map(int, s)) for s in (getattr(gc, "stop_words_ids", None) or []) if len(s)]
    if stop_words and not eos_ids:
        raise ValueError("stop_words_ids need an eos_token_id to stop on")
    seeds = list(seed) if isinstance(seed, Sequence) else [seed] * B
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds given for a batch of {B}")
    base = SamplingParams.from_generation_config(gc)
    params = [replace(base, seed=s if s is not None else base.seed).validate() for s in seeds]

    mask = attention_mask.bool() if attention_mask is not None else None
    rows = [input_ids[i][mask[i]].tolist() if mask is not None else input_ids[i].tolist() for i in range(B)]
    row_images = _row_images(model, rows, images)
    engine = Engine(model, max_batch_size=B, max_seq_len=max(map(len, rows)) + max_new, reuse_prefixes=0)
    handles = [
        engine.submit(
            GenerationRequest(
                prompt_ids=rows[i],
                sampling=params[i],
                max_new_tokens=max_new,
                stop_words_ids=stop_words,
                eos_token_ids=eos_ids,
                images=row_images[i],
            )
        )  # fmt: skip
        for i in range(B)
    ]
    step = 0
    while step < max_new:
        busy = engine.step()
        failed = next((h for h in handles if h.finish_reason == "error"), None)
        if failed is not None:
            raise ValueError(failed.error)
        while step < max_new and all(len(h.token_ids) > step or h.finished for h in handles):
            if all(len(h.token_ids) <= step for h in handles):
                return
            tokens = [h.token_ids[step] if len(h.token_ids) > step else pad_id for h in handles]
            yield torch.tensor(tokens, device=input_ids.device)
            step += 1
        if not busy:
            return


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Prompt ids followed by generated ids (B, T + n), as ``transformers`` returns them.

    Keywords: ``attention_mask``, ``generation_config``, ``images``, ``seed`` (one
    or one per row), and the generation fields ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``repetition_penalty``, ``max_new_tokens``,
    ``max_length``, ``eos_token_id``, ``pad_token_id``, ``stop_words_ids``.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    steps = list(generate_stream(model, input_ids, **kwargs))
    if not steps:
        return input_ids
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)
