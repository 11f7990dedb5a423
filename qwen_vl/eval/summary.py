"""``summary.md`` / ``summary.json``: one row per task evaluated into an output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..model.saving import atomic_write


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The ``metrics.json`` of every task folder under ``out``, by task name."""
    rows = []
    for path in sorted(out.glob("*/metrics.json")):
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return rows


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: task, headline metric and value, mode, style, items, then the other metrics."""
    lines = [
        "| task | metric | value | mode | style | items | other metrics |",
        "| --- | --- | ---: | --- | --- | ---: | --- |",
    ]
    for r in rows:
        metrics = r.get("metrics", {})
        head = r.get("metric", "")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != head}
        others = ", ".join(f"{k} {_cell(v)}" for k, v in scalars.items())
        lines.append(
            f"| {r['task']} | {head} | {_cell(metrics.get(head, ''))} | {r.get('mode', '')} | "
            f"{r.get('style', '')} | {r.get('items', '')} | {others} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> Path:
    """Rewrite ``out/summary.md`` and ``out/summary.json`` from the task folders; returns the .md path."""
    rows = read_metrics(out)
    text = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / "summary.json", lambda p: p.write_text(text, encoding="utf-8"))
    md = out / "summary.md"
    table = summary_table(rows)
    atomic_write(md, lambda p: p.write_text(table, encoding="utf-8"))
    return md
