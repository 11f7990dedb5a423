"""``qwen-vl pretrain-vision``: train a vision tower from scratch on shapes-world pictures,
with per-cell labels, before fine-tuning the whole model (``qwen_vl.finetune.vision_pretrain``)."""

from __future__ import annotations

import argparse

from ..finetune.vision_pretrain import VisionPretrainSettings, pretrain_vision


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = VisionPretrainSettings("", [], "")
    p = sub.add_parser(
        "pretrain-vision",
        help="train the vision tower on shapes-world pictures with per-cell labels",
        description="Teach the vision tower of a from-scratch model to tell, at each of its output features, "
        "the colour, shape and box of the object there and the letters written there (linear read-outs, "
        "dropped afterwards). Writes OUTPUT_DIR/final, the whole checkpoint with the trained tower. "
        "Rerunning the same command continues an interrupted run.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint to start from (qwen-vl init)")
    p.add_argument("--data", required=True, nargs="+", metavar="DIR", help="qwen-vl synth folder(s)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="state.pt, log.jsonl and final/")
    p.add_argument("--eval-data", default=None, metavar="DIR", help="held-out synth folder scored at every save")
    p.add_argument("--eval-pictures", type=int, default=d.eval_pictures)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pictures per step")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="of the tower")
    p.add_argument("--head-learning-rate", type=float, default=d.head_learning_rate, help="of the read-outs")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--box-weight", type=float, default=d.box_weight, help="weight of the box loss (L1 of the box fractions)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-steps", type=int, default=d.save_steps)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run_pretrain_vision)


def run_pretrain_vision(args: argparse.Namespace) -> int:
    settings = VisionPretrainSettings(
        model=args.model,
        data=list(args.data),
        output_dir=args.output_dir,
        eval_data=args.eval_data,
        eval_pictures=args.eval_pictures,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        head_learning_rate=args.head_learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        box_weight=args.box_weight,
        seed=args.seed,
        save_steps=args.save_steps,
        threads=args.threads,
    )
    final = pretrain_vision(settings, quiet=args.quiet)
    print(f"vision tower trained; checkpoint in {final}")
    return 0
