"""The decode loop behind ``model.generate``: batched prefill into a preallocated
KV cache, then one token per step for every row, with per-row sampling, stop
words and end-of-sequence handling.

Rows of different lengths are laid out left-aligned-to-the-end (left padding)
internally whatever padding the caller used; each row attends only to its own
tokens and counts positions from its own first token, so a row of a batch
generates exactly what it generates alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from .kv_cache import KVCache
from .sampling import SamplingParams, select_next_tokens
from .stopping import force_eos_after_stop_words

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


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int):
    """Move each row's real tokens to the end: (ids, mask) both (B, T); mask None if unpadded."""
    if attention_mask is None or bool(attention_mask.all()):
        return input_ids, None
    mask = attention_mask.bool()
    lengths = mask.sum(-1)  # (B,)
    T = input_ids.shape[1]
    order = torch.sort((~mask).long() * -1, dim=-1, stable=True).indices  # pads first, tokens keep order
    ids = torch.gather(input_ids, 1, order)
    new_mask = torch.arange(T, device=mask.device)[None, :] >= (T - lengths)[:, None]
    ids = torch.where(new_mask, ids, torch.full_like(ids, pad_id))
    return ids, new_mask


def generate_stream(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config=None,
    images: Sequence[Any] | None = None,
    seed: int | Sequence[int | None] | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) at each step.

    Rows that finished (end-of-sequence) yield the pad id. Stops when every row
    finished or after ``max_new_tokens`` steps.
    """
    gc = resolve_generation_config(model, generation_config, **kwargs)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    device = input_ids.device
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
    generators = [_generator(p, device) for p in params]

    ids, mask = left_align(input_ids, attention_mask, pad_id)
    seq = torch.full((B, T + max_new), pad_id, dtype=torch.long, device=device)
    seq[:, :T] = ids
    seq_mask = torch.ones(B, T + max_new, dtype=torch.bool, device=device)
    if mask is not None:
        seq_mask[:, :T] = mask
    cfg = model.config
    cache = KVCache(
        cfg.num_hidden_layers, B, cfg.num_attention_heads, cfg.head_dim, T + max_new,
        dtype=model.lm_head.weight.dtype, device=device,
    )  # fmt: skip
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = model(ids, attention_mask=mask, images=images, kv_cache=cache, logits_to_keep=1)
    for step in range(max_new):
        end = T + step
        scores = out.logits[:, -1].float()  # (B, V)
        if stop_words:
            force_eos_after_stop_words(scores, seq[:, :end], seq_mask[:, :end], stop_words, eos_ids[0])
        next_tokens = select_next_tokens(scores, seq[:, :end], seq_mask[:, :end], params, generators)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        seq[:, end] = next_tokens
        yield next_tokens
        if eos.numel():
            finished |= torch.isin(next_tokens, eos)
        if step + 1 == max_new or bool(finished.all()):
            return
        out = model(next_tokens[:, None], kv_cache=cache, logits_to_keep=1)


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-row generator for seeded sampling rows; unseeded rows draw from the global RNG."""
    if not params.do_sample or params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


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
