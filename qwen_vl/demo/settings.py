"""The generation settings a user picks in the demo: temperature, top-p, max new tokens, seed."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..engine.sampling import SamplingParams
from .errors import DemoError

MAX_TEMPERATURE = 2.0
RANDOM_SEED = -1  # the seed setting that asks for fresh draws


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DemoError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GenerationSettings:
    """One answer's settings. ``temperature`` 0 means greedy decoding; ``seed`` None draws freshly."""

    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None = None

    @classmethod
    def checked(cls, temperature: Any, top_p: Any, max_new_tokens: Any, seed: Any, limit: int) -> GenerationSettings:
        """Settings from the values a browser or an API client sent; DemoError names a bad one.

        ``max_new_tokens`` must lie in ``1..limit``; ``seed`` -1 or None draws freshly.
        """
        t = _number(temperature, "temperature")
        if not 0 <= t <= MAX_TEMPERATURE:
            raise DemoError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {t:g}")
        p = _number(top_p, "top_p")
        if not 0 < p <= 1:
            raise DemoError(f"top_p must be above 0 and at most 1, got {p:g}")
        n = _number(max_new_tokens, "max new tokens")
        if n != int(n) or not 1 <= n <= limit:
            raise DemoError(f"max new tokens must be a whole number from 1 to {limit}, got {n:g}")
        if seed is not None:
            s = _number(seed, "seed")
            if s != int(s) or s < RANDOM_SEED:
                raise DemoError(f"seed must be a whole number of 0 or more, or {RANDOM_SEED} for random, got {s:g}")
            seed = None if s == RANDOM_SEED else int(s)
        return cls(t, p, int(n), seed)

    @classmethod
    def defaults(cls, base: SamplingParams, max_new_tokens: int, limit: int) -> GenerationSettings:
        """The settings shown at start: ``base`` (the checkpoint's, under the command's flags)."""
        temperature = min(base.temperature, MAX_TEMPERATURE) if base.do_sample else 0.0
        return cls(temperature, base.top_p, min(max_new_tokens, limit), base.seed)

    def sampling(self, base: SamplingParams) -> SamplingParams:
        """``base`` (top-k, repetition penalty) with these settings over it."""
        if self.temperature == 0:
            return replace(base, do_sample=False, top_p=self.top_p, seed=self.seed)
        return replace(base, do_sample=True, temperature=self.temperature, top_p=self.top_p, seed=self.seed).validate()
