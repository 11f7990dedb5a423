"""``qwen-vl init``: a checkpoint with random weights, to train a model from scratch."""

from __future__ import annotations

import argparse

from ..finetune.merge import DEFAULT_MAX_SHARD_SIZE
from ..finetune.scratch import RESAMPLER_INITS, init_checkpoint
from .options import DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a checkpoint with random weights (to train from scratch)")
    p.add_argument("--like", required=True, metavar="DIR", help="directory with config.json and tokenizer files")
    p.add_argument("--config", default=None, metavar="FILE", help="another config.json for the sizes")
    p.add_argument("--out", required=True, metavar="DIR", help="new checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="auto: the config's torch_dtype")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB")
    p.add_argument(
        "--resampler",
        choices=RESAMPLER_INITS,
        default="local",
        help="local: each resampler query starts on its own patch (default); random: plain random",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run_init)


def run_init(args: argparse.Namespace) -> int:
    files = init_checkpoint(
        args.like,
        args.out,
        config=args.config,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        resampler=args.resampler,
    )
    print(f"wrote {len(files)} weight file(s) to {args.out}")
    return 0
