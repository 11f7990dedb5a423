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


class ProgressLine:
    """A ``[####....]`` progress line on stderr (by default): redrawn in place on a terminal,
    one line per update otherwise; nothing when ``quiet``."""

    def __init__(self, total: int, stream: TextIO | None = None, quiet: bool = False, start_at: int = 0) -> None:
        """``start_at``: the count this run starts after (a resumed run's), for the time left."""
        self.total = total
        self.out = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.live = bool(getattr(self.out, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.start_at = start_at

    def bar(self, done: int, width: int = 20) -> str:
        filled = int(width * done / max(self.total, 1))
        return "[" + "#" * filled + "." * (width - filled) + "]"

    def timing(self, done: int) -> str:
        """``"40s elapsed, 2m10s left"``, the time left from this run's pace so far."""
        elapsed = time.monotonic() - self.start
        ran = done - self.start_at
        left = elapsed / ran * (self.total - done) if ran > 0 else 0.0
        return f"{format_duration(elapsed)} elapsed, {format_duration(left)} left"

    def show(self, text: str) -> None:
        if self.quiet:
            return
        self.out.write(f"\r\033[K{text}" if self.live else f"{text}\n")
        self.out.flush()

    def close(self) -> None:
        if self.live and not self.quiet:
            self.out.write("\n")
            self.out.flush()


class TrainingProgress(ProgressLine):
    """Step, loss, learning rate, rate and time left, one line per update."""

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
        super().__init__(total_steps, stream, quiet, start_at=start_step)
        self.unit = unit

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float) -> str:
        return (
            f"{self.bar(step)} step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} {self.unit} | {self.timing(step)}"
        )

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.quiet:
            self.show(self.line(step, loss, lr, tokens_per_s))
