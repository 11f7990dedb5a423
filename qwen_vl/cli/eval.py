"""``qwen-vl eval``: one benchmark task on one model, from local data files."""

from __future__ import annotations

import argparse
import sys

from ..chat import DEFAULT_SYSTEM
from .options import DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate on a benchmark task (local data files)",
        description="Answer every item of a benchmark task and score the answers. Under torchrun each "
        "process answers a slice; a run started again with the same options continues where it stopped.",
    )
    p.add_argument("--task", help="task name (--list-tasks shows them)")
    p.add_argument("--data", metavar="PATH", help="the benchmark's file or folder, as its authors ship it")
    p.add_argument("--model", metavar="DIR", help="checkpoint directory")
    p.add_argument("--out", metavar="DIR", help="results folder (one subfolder per task, summary.md)")
    p.add_argument(
        "--image-root", default=None, metavar="DIR", help="where the images are (default: the task's layout)"
    )
    p.add_argument(
        "--style", choices=("auto", "base", "chat"), default="auto", help="prompt style (auto: from the model)"
    )
    p.add_argument("--mode", choices=("canonical", "qwen"), default="canonical", help="scorer: canonical or Qwen-VL's")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of stopping")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (torchrun: each process its GPU)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 on CPU, the checkpoint's on GPU")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt of chat-style prompts")
    p.add_argument("--restart", action="store_true", help="discard earlier predictions in --out")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..eval.registry import all_tasks
    from ..eval.runner import EvalSettings, evaluate
    from .errors import CliError

    if args.list_tasks:
        for name, cls in all_tasks().items():
            print(f"{name:<28} {cls.family:<16} {cls.metric}")
        return 0
    missing = [f"--{n}" for n in ("task", "data", "model", "out") if getattr(args, n) is None]
    if missing:
        raise CliError(f"missing {', '.join(missing)} (or --list-tasks)")
    settings = EvalSettings(
        task=args.task, data=args.data, model=args.model, out=args.out, image_root=args.image_root,
        style=args.style, mode=args.mode, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        limit=args.limit, skip_bad=args.skip_bad, device=args.device, dtype=args.dtype, system=args.system,
        restart=args.restart,
    )  # fmt: skip
    result = evaluate(settings, quiet=args.quiet)
    if result.metrics:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items() if isinstance(v, (int, float)))
        print(f"{result.task} ({settings.mode}): {shown}; {result.items} items -> {result.out_dir}", file=sys.stdout)
    return 0
