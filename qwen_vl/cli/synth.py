"""``qwen-vl synth``: write a synthetic "shapes world" data set (pictures, conversations, truth)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.conversations import KINDS, LANGS
from .errors import CliError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic shapes-world data set",
        description="Draw simple scenes of coloured shapes and words, and write conversations about them "
        "in the official fine-tuning format (data.json) with their exact ground truth (truth.jsonl). "
        "The same seed writes the same files.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (images/, data.json, truth.jsonl)")
    p.add_argument("--n", required=True, type=int, help="number of records (conversations)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--langs", default=",".join(LANGS), help=f"comma-separated languages (default {','.join(LANGS)})")
    p.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated kinds of question (default: all of {', '.join(KINDS)})",
    )
    p.add_argument("--turns", default="2-3", metavar="MIN-MAX", help="questions per multiturn record (default 2-3)")
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes drawing pictures (same output)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run_synth)


def _names(value: str, known: Sequence[str], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise CliError(f"--{what}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(known)}")
    return names


def synth(
    out: str | Path,
    n: int,
    seed: int = 0,
    *,
    langs: Sequence[str] = LANGS,
    kinds: Sequence[str] = KINDS,
    turns: tuple[int, int] = (2, 3),
    workers: int = 1,
    quiet: bool = False,
) -> dict[str, Any]:
    """Write the data set and return its manifest; progress goes to stderr unless ``quiet``."""
    from ..data.synthetic import generate

    if n < 1:
        raise CliError(f"--n must be at least 1, got {n}")
    if workers < 1:
        raise CliError(f"--workers must be at least 1, got {workers}")

    def progress(done: int) -> None:
        print(f"\rqwen-vl: synth {done}/{n} records", end="", file=sys.stderr, flush=True)

    try:
        manifest = generate(
            out, n, seed, kinds=kinds, langs=langs, turns=turns, workers=workers, progress=None if quiet else progress
        )
    except ValueError as e:
        raise CliError(str(e)) from e
    if not quiet:
        print(file=sys.stderr)
    return manifest


def run_synth(args: argparse.Namespace) -> int:
    langs = _names(args.langs, LANGS, "langs")
    kinds = _names(args.kinds, KINDS, "kinds")
    low, _, high = args.turns.partition("-")
    try:
        turns = (int(low), int(high or low))
    except ValueError:
        raise CliError(f"--turns: expected MIN-MAX such as 2-3, got {args.turns!r}") from None
    manifest = synth(
        args.out, args.n, args.seed, langs=langs, kinds=kinds, turns=turns, workers=args.workers, quiet=args.quiet
    )
    print(f"{manifest['n']} records, {manifest['images']} images -> {Path(args.out) / 'data.json'}")
    return 0
