"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

The factors equal those of ``transformers``' ``get_cosine_schedule_with_warmup``,
``get_linear_schedule_with_warmup`` and ``get_constant_schedule_with_warmup`` (what
the official fine-tuning script uses) for every step up to ``total_steps``, with two
additions: ``min_lr_ratio`` sets a floor the decay ends at, and steps past
``total_steps`` stay at that floor instead of rising again.

The schedule is a ``LambdaLR`` whose factor is a small callable object, so its
parameters travel in ``scheduler.state_dict()`` and come back with ``load_state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

ScheduleKind = Literal["cosine", "linear", "constant"]
KINDS: tuple[str, ...] = ("cosine", "linear", "constant")


@dataclass
class LRFactor:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based)."""

    kind: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay


def resolve_warmup_steps(total_steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None) -> int:
    """Warmup length in steps: ``warmup_steps`` as given, or ``ceil(warmup_ratio * total_steps)``."""
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError(f"give warmup_steps ({warmup_steps}) or warmup_ratio ({warmup_ratio}), not both")
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        return math.ceil(warmup_ratio * total_steps)
    warmup_steps = 0 if warmup_steps is None else warmup_steps
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    return warmup_steps


def make_scheduler(
    optimizer: Optimizer,
    kind: ScheduleKind = "cosine",
    *,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` over ``optimizer``: warmup from 0 to the base rate, then ``kind`` decay.

    ``total_steps`` counts optimizer steps (after gradient accumulation). The decay
    ends at ``min_lr_ratio`` times the base rate at step ``total_steps``.
    """
    if kind not in KINDS:
        raise ValueError(f"schedule kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup = resolve_warmup_steps(total_steps, warmup_steps, warmup_ratio)
    return LambdaLR(optimizer, LRFactor(kind, warmup, total_steps, min_lr_ratio))
