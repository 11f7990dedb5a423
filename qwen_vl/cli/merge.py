"""``qwen-vl merge``: fold a LoRA adapter into its base model, in the official layout."""

from __future__ import annotations

import argparse

from ..finetune.merge import DEFAULT_MAX_SHARD_SIZE, merge


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model")
    p.add_argument("--base", required=True, metavar="DIR", help="the checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (e.g. OUTPUT_DIR/final)")
    p.add_argument("--out", required=True, metavar="DIR", help="new directory for the merged model")
    p.add_argument("--dtype", default="auto", help="auto (the base's), bfloat16, float16 or float32")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    merge(
        args.base,
        args.adapter,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    return 0
