"""Choosing the next token of every row from the model's scores.

Each row of a batch may carry its own :class:`SamplingParams`. The scores go
through, in order: repetition penalty (all rows), then for sampling rows
temperature, top-k and top-p, and finally argmax (greedy rows) or a draw from
the softmax (sampling rows). The arithmetic matches the ``transformers``
processors ``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper`` and ``TopPLogitsWarper`` and is done in float32.

Per-row parameter tensors are built once per distinct parameter set and
device and then reused, so a decode step copies nothing from the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SamplingParams", "LogitsPipeline", "make_generators", "select_next_tokens", "apply_repetition_penalty"]


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its next token. ``top_k=0`` and ``top_p=1`` turn those filters off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        """Raise ``ValueError`` naming the first out-of-range field; return ``self``."""
        if self.do_sample and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number when sampling, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a positive number, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        return self

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0

    @classmethod
    def from_generation_config(cls, gc: Any = None, **overrides: Any) -> SamplingParams:
        """Read the sampling fields of ``gc`` (an object with attributes, or a mapping).

        Missing fields and fields set to None take the defaults; ``overrides``
        given as None leave the value from ``gc`` in place.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(overrides) - set(names)
        if unknown:
            raise TypeError(f"unknown sampling fields: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in names:
            value = overrides.get(name)
            if value is None and gc is not None:
                value = gc.get(name) if isinstance(gc, Mapping) else getattr(gc, name, None)
            if value is not None:
                values[name] = value
        casts = {"do_sample": bool, "temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}
        return cls(**{k: casts[k](v) if k in casts else v for k, v in values.items()})


def make_generators(
    params: Sequence[SamplingParams], device: torch.device | str = "cpu"
) -> list[torch.Generator | None]:
    """One generator per sampling row (None for greedy rows), kept for the whole generation.

    A row with a seed is seeded from it; a row without one from the global
    CPU RNG, so the draws are reproducible under ``torch.manual_seed``.
    """
    out: list[torch.Generator | None] = []
    for p in params:
        if not p.do_sample:
            out.append(None)
            continue
        g = torch.Generator(device=device)
        g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        out.append(g)
    return out


def apply_repetition_penalty(
    scores: torch.Tensor, prev_ids: torch.Tensor, prev_mask: torch.Tensor | None, penalty: torch.Tensor
) -> torch.Tensor:
    """Penalise, in place, every token id present in a row's valid previous ids.

    scores (B, V) float; prev_ids (B, T) long; prev_mask (B, T) bool or None
    (True = real token); penalty (B, 1) float. A penalised score becomes
    ``s * p`` if ``s < 0`` else ``s / p``; each id is penalised once however
    often it occurs. Ids outside ``[0, V)`` are ignored. Returns ``scores``.
    """
    V = scores.shape[-1]
    if prev_ids.shape[-1] == 0:
        return scores
    valid = (prev_ids >= 0) & (prev_ids < V)  # (B, T)
    if prev_mask is not None:
        valid &= prev_mask.bool()
    # Masked slots repeat the row's first valid id, so the scatter below writes
    # one value per id; rows with no valid id get a penalty of 1 (a no-op).
    has_any = valid.any(dim=1, keepdim=True)  # (B, 1)
    first = valid.int().argmax(dim=1, keepdim=True)  # (B, 1)
    fill = prev_ids.gather(1, first)  # (B, 1)
    idx = torch.where(valid, prev_ids, fill)
    idx = torch.where(has_any, idx, torch.zeros_like(idx))  # (B, T), all in [0, V)
    p = torch.where(has_any, penalty, torch.ones_like(penalty))  # (B, 1)
    picked = scores.gather(1, idx)  # (B, T)
    return scores.scatter_(1, idx, torch.where(picked < 0, picked * p, picked / p))


class LogitsPipeline:
    """The per-row parameters of one batch, as tensors on one device.

    Build with :meth:`build` (cached) and call :meth:`select` each step.
    """

    def __init__(self, params: tuple[SamplingParams, ...], device: torch.device, vocab_size: int):
        for p in params:
            p.validate()
        self.params = params
        self.device = device
        self.vocab_size = vocab_size
        f32 = dict(dtype=torch.float32, device=device)
        self.batch_size = len(params)
        self.penalty = None  # (B, 1)
        if any(p.penalised for p in params):
            self.penalty = torch.tensor([[p.repetition_penalty] for p in params], **f32)
        self.sample_rows = tuple(i for i, p in enumerate(params) if p.do_sample)
        sampled = [params[i] for i in self.sample_rows]
        n = len(sampled)
        self.all_sample = n == self.batch_size
        self.sample_index = None if self.all_sample or n == 0 else _index(self.sample_rows, device)  # (S,)
        # Warper parameters for the sampling rows only: (S, 1) each, None when no row uses them.
        self.temperature = None
        if any(p.temperature != 1.0 for p in sampled):
            self.temperature = torch.tensor([[p.temperature] for p in sampled], **f32)
        ks = [min(p.top_k, vocab_size) for p in sampled]
        self.k_max = max(ks, default=0)
        self.k_pos = self.k_on = None
        if self.k_max > 0:
            self.k_pos = torch.tensor([[max(k, 1) - 1] for k in ks], dtype=torch.long, device=device)
            self.k_on = torch.tensor([[k > 0] for k in ks], dtype=torch.bool, device=device)
        self.p_cut = None
        if any(p.top_p < 1.0 for p in sampled):
            # Remove sorted tokens whose cumulative probability is <= 1 - top_p; -1 removes nothing.
            self.p_cut = torch.tensor([[1 - p.top_p if p.top_p < 1.0 else -1.0] for p in sampled], **f32)

    @staticmethod
    def build(params: Sequence[SamplingParams], device: torch.device | str, vocab_size: int) -> LogitsPipeline:
        return _pipeline(tuple(params), torch.device(device), int(vocab_size))

    @property
    def trivial(self) -> bool:
        """All rows greedy without penalty: the choice is a plain argmax."""
        return self.penalty is None and not self.sample_rows

    def warp(self, scores: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """Temperature, top-k and top-p on the sampling rows' scores (S, V) float32.

        Modifies ``scores`` in place only when ``owned``; returns the result.
        """
        if self.temperature is not None:
            scores = scores.div_(self.temperature) if owned else scores / self.temperature
            owned = True
        if self.k_max > 0:
            kth = torch.topk(scores, self.k_max, dim=-1).values.gather(1, self.k_pos)  # (S, 1)
            kth = torch.where(self.k_on, kth, torch.full_like(kth, -math.inf))
            drop = scores < kth  # (S, V)
            scores = scores.masked_fill_(drop, -math.inf) if owned else scores.masked_fill(drop, -math.inf)
            owned = True
        if self.p_cut is not None:
            sorted_scores, order = torch.sort(scores, dim=-1)  # ascending, (S, V)
            drop = sorted_scores.softmax(dim=-1).cumsum_(dim=-1) <= self.p_cut
            drop[:, -1] = False  # always keep the most likely token
            sorted_scores.masked_fill_(drop, -math.inf)
            if not owned:
                scores = torch.empty_like(scores)
            scores.scatter_(1, order, sorted_scores)
        return scores

    def select(
        self,
        scores: torch.Tensor,
        prev_ids: torch.Tensor | None,
        prev_mask: torch.Tensor | None,
        generators: Sequence[torch.Generator | None] | None,
    ) -> torch.Tensor:
        """Next token of every row (B,) long; see :func:`select_next_tokens`."""
        if scores.dim() != 2 or scores.shape != (self.batch_size, self.vocab_size):
            raise ValueError(f"scores of shape {tuple(scores.shape)}, expected ({self.batch_size}, {self.vocab_size})")
        owned = scores.dtype != torch.float32
        scores = scores.float()
        if self.penalty is not None and prev_ids is not None:
            if not owned:
                scores = scores.clone()
                owned = True
            apply_repetition_penalty(scores, prev_ids, prev_mask, self.penalty)
        next_tokens = scores.argmax(dim=-1)  # (B,)
        if not self.sample_rows:
            return next_tokens
        if self.all_sample:
            probs = self.warp(scores, owned).softmax(dim=-1)  # (B, V)
        else:
            probs = self.warp(scores.index_select(0, self.sample_index), owned=True).softmax(dim=-1)  # (S, V)
        gens = list(generators) if generators is not None else [None] * self.batch_size
        if len(gens) != self.batch_size:
            raise ValueError(f"{len(gens)} generators for a batch of {self.batch_size}")
        shared = [j for j, i in enumerate(self.sample_rows) if gens[i] is None]
        if len(shared) == len(self.sample_rows):
            # One draw for all sampling rows from the global RNG, as transformers does.
            drawn = torch.multinomial(probs, 1).squeeze(1)  # (S,)
            if self.all_sample:
                return drawn
            return next_tokens.index_copy_(0, self.sample_index, drawn)
        if shared:
            drawn = torch.multinomial(probs.index_select(0, _index(tuple(shared), probs.device)), 1).squeeze(1)
            next_tokens.index_copy_(0, _index(tuple(self.sample_rows[j] for j in shared), probs.device), drawn)
        for j, i in enumerate(self.sample_rows):
            if gens[i] is not None:
                next_tokens[i] = torch.multinomial(probs[j], 1, generator=gens[i])[0]
        return next_tokens


@functools.lru_cache(maxsize=64)
def _pipeline(params: tuple[SamplingParams, ...], device: torch.device, vocab_size: int) -> LogitsPipeline:
    return LogitsPipeline(params, device, vocab_size)


@functools.lru_cache(maxsize=256)
def _index(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def select_next_tokens(
    scores: torch.Tensor,
    prev_ids: torch.Tensor | None,
    prev_mask: torch.Tensor | None,
    params: Sequence[SamplingParams] | SamplingParams,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next token of every row: (B,) long on the scores' device.

    scores (B, V) logits of any float dtype (not modified); prev_ids (B, T)
    prompt + generated ids, with prev_mask (B, T) bool marking real tokens
    (None: all real); params one per row or one for all. Greedy rows take the
    argmax of the penalised scores; sampling rows draw from the warped
    softmax with their generator from ``generators`` (one entry per row, e.g.
    from :func:`make_generators`, kept across steps), or with the global RNG
    where the entry is None.
    """
    if isinstance(params, SamplingParams):
        params = [params] * scores.shape[0]
    pipeline = LogitsPipeline.build(params, scores.device, scores.shape[-1])
    if pipeline.trivial:
        return scores.argmax(dim=-1)
    return pipeline.select(scores, prev_ids, prev_mask, generators)
