"""The training progress line: step, loss, learning rate, tokens/s and time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class TrainingProgress:
    """Shows one line per update: redrawn in place on a terminal, appended otherwise."""

    def __init__(
        self,
        total_steps: int,
        stream: TextIO | None = None,
        quiet: bool = False,
        start_step: int = 0,
        unit: str = "tok/s",
    ) -> None:
        """``start_step``: the step training starts after (a resumed run's), for the time left;
        ``unit``: what the rate counts."""
        self.unit = unit
        self.total = total_steps
        self.out = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.live = bool(getattr(self.out, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.first_step = start_step

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float) -> str:
        done = step - self.first_step
        elapsed = time.monotonic() - self.start
        left = elapsed / done * (self.total - step) if done > 0 else 0.0
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        return (
            f"[{bar}] step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} {self.unit} | {format_duration(elapsed)} elapsed, {format_duration(left)} left"
        )

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.quiet:
            return
        text = self.line(step, loss, lr, tokens_per_s)
        self.out.write(f"\r\033[K{text}" if self.live else f"{text}\n")
        self.out.flush()

    def close(self) -> None:
        if self.live and not self.quiet:
            self.out.write("\n")
            self.out.flush()
