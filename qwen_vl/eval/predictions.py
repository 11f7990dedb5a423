"""Prediction files: one JSON object per line, appended as answers come, so that a
killed run knows what it has done.

Each process of a run appends to its own ``predictions.rank{r}.jsonl``; a line is
written whole and flushed, and a partial last line (the process died while
writing it) is cut off when the file is opened again. The final
``predictions.jsonl`` (every item in the task's order) is written atomically by
the first process once all are done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from ..model.saving import atomic_write

MERGED = "predictions.jsonl"


def rank_file(out_dir: Path, rank: int) -> Path:
    return out_dir / f"predictions.rank{rank}.jsonl"


def _complete_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of ``path`` and the byte length of its complete lines (a torn last line excluded)."""
    rows, good = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            good += len(raw)
    return rows, good


def read_done(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every prediction already written in ``out_dir`` (any rank, any earlier world size), by item id."""
    done: dict[str, dict[str, Any]] = {}
    for path in sorted(out_dir.glob("predictions.rank*.jsonl")):
        rows, _ = _complete_lines(path)
        done.update((str(r["id"]), r) for r in rows)
    return done


class PredictionWriter:
    """Appends rows to this process's prediction file, one flushed line each."""

    def __init__(self, out_dir: Path, rank: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = rank_file(out_dir, rank)
        if self.path.exists():
            _, good = _complete_lines(self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good)  # drop a line torn by a kill
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def write_merged(out_dir: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write the final predictions file (atomically) and return its path."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = out_dir / MERGED
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path
