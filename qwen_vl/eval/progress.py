"""The evaluation progress line: items answered, items/s and time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..finetune.progress import format_duration


class EvalProgress:
    """One line per answered item: redrawn in place on a terminal, every 5% elsewhere."""

    def __init__(self, total: int, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.total = total
        self.done = 0
        self.out = stream if stream is not None else sys.stderr
        self.quiet = quiet or total == 0
        self.live = bool(getattr(self.out, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._shown = -1

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        return f"{self.done}/{self.total} items | {rate:.2f} items/s | {format_duration(left)} left"

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.quiet:
            return
        if self.live:
            self.out.write(f"\r\033[K{self.line()}")
        else:
            step = int(20 * self.done / self.total)
            if step == self._shown and self.done < self.total:
                return
            self._shown = step
            self.out.write(self.line() + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.live and not self.quiet:
            self.out.write("\n")
            self.out.flush()
