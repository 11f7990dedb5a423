"""A status line on stderr while something slow runs (stdout stays clean)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_FRAMES = "|/-\\"


@contextmanager
def status(message: str, stream: TextIO | None = None, quiet: bool = False) -> Iterator[None]:
    """Show ``message`` with the elapsed seconds until the block ends.

    On a terminal the line is redrawn in place four times a second; elsewhere
    one line is written when the block starts and one when it ends.
    """
    out = stream if stream is not None else sys.stderr
    if quiet:
        yield
        return
    start = time.monotonic()
    live = bool(getattr(out, "isatty", lambda: False)())
    done = threading.Event()

    def spin() -> None:
        frame = 0
        while not done.wait(0.25):
            out.write(f"\r{_FRAMES[frame % len(_FRAMES)]} {message} {time.monotonic() - start:.1f} s")
            out.flush()
            frame += 1

    thread = threading.Thread(target=spin, daemon=True) if live else None
    if thread is not None:
        thread.start()
    else:
        out.write(f"qwen-vl: {message}\n")
        out.flush()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        if thread is not None:
            thread.join()
            out.write("\r\033[K")
        elapsed = time.monotonic() - start
        out.write(f"qwen-vl: {message} {'done' if ok else 'failed'} in {elapsed:.1f} s\n")
        out.flush()
