"""``qwen-vl finetune``: full, LoRA or Q-LoRA fine-tuning on conversations in the official format."""

from __future__ import annotations

import argparse
import sys

from ..finetune.lora import DEFAULT_TARGETS
from ..finetune.settings import DTYPES, LOSS_VOCABS, SCHEDULE_KINDS, FinetuneSettings
from ..finetune.supervised import TRUNCATION_POLICIES
from .errors import CliError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune on conversations (JSON / JSONL)",
        description="Fine-tune a checkpoint on conversations in the official format. Under torchrun, "
        "each process trains on its slice of every global batch.",
    )
    io = p.add_argument_group("model and data")
    io.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory to start from")
    io.add_argument("--data", required=True, nargs="+", metavar="FILE", help="JSON or JSONL conversation file(s)")
    io.add_argument("--output-dir", required=True, metavar="DIR", help="checkpoints, loss curve and final weights")
    io.add_argument(
        "--image-root", default=None, metavar="DIR", help="where image paths resolve (default: data file's folder)"
    )
    io.add_argument("--model-max-length", type=int, default=2048, help="tokens per sample (default 2048)")
    io.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="drop", help="records over the length")
    io.add_argument("--skip-bad", action="store_true", help="leave out invalid records (listed in data_report.json)")
    io.add_argument("--system", default=None, help="system prompt of records without one")

    mode = p.add_argument_group("what trains")
    mode.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    mode.add_argument("--q-lora", action="store_true", help="LoRA over a 4-bit NF4 base (CUDA + bitsandbytes)")
    mode.add_argument("--lora-r", type=int, default=64)
    mode.add_argument("--lora-alpha", type=float, default=16)
    mode.add_argument("--lora-dropout", type=float, default=0.05)
    mode.add_argument(
        "--lora-targets",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        metavar="NAME",
        help="module names in the LLM blocks",
    )
    mode.add_argument(
        "--train-embeddings", action="store_true", help="with --lora: train wte and lm_head in full (the base model)"
    )
    vit = mode.add_mutually_exclusive_group()
    vit.add_argument("--fix-vit", dest="fix_vit", action="store_true", default=True, help="freeze the ViT (default)")
    vit.add_argument("--train-vit", dest="fix_vit", action="store_false", help="train the ViT too")
    mode.add_argument(
        "--fix-resampler",
        dest="train_resampler",
        action="store_false",
        help="freeze the resampler too (trained by default); with --fix-vit the whole vision tower is frozen",
    )

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--learning-rate", type=float, default=1e-5)
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--adam-beta2", type=float, default=0.95)
    opt.add_argument("--lr-scheduler", choices=SCHEDULE_KINDS, default="cosine")
    opt.add_argument("--warmup-ratio", type=float, default=0.01)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    opt.add_argument("--epochs", type=int, default=1)
    opt.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    opt.add_argument("--batch-size", type=int, default=1, help="samples per process per micro-batch")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=1)
    opt.add_argument("--no-group-by-length", dest="group_by_length", action="store_false", help="plain shuffling")
    opt.add_argument(
        "--loss-vocab",
        choices=LOSS_VOCABS,
        default="full",
        help="softmax of the loss over every token (default) or over the data's tokens and a fresh sample of "
        "4,096 others per step (much faster for a small model on a narrow domain; full fine-tuning only)",
    )
    opt.add_argument(
        "--look-loss-weight",
        type=float,
        default=0.0,
        help="weight of the look loss: answers' 'regions' tell one attention layer where to look (0: off)",
    )
    opt.add_argument("--look-loss-layer", type=int, default=1, help="the layer whose attention the look loss trains")
    opt.add_argument("--look-loss-heads", type=int, default=1, help="how many of its heads (the first ones)")

    run = p.add_argument_group("running")
    run.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU, float32 on CPU")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (torchrun: each process its GPU)")
    run.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the end)")
    run.add_argument("--save-total-limit", type=int, default=3, help="checkpoints kept")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    run.add_argument("--logging-steps", type=int, default=1)
    run.add_argument(
        "--dataloader-workers",
        type=int,
        default=0,
        help="processes that open and resize the next batches' pictures while the model trains (0: in the step)",
    )
    shard = run.add_mutually_exclusive_group()
    shard.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state (FSDP2)")
    shard.add_argument(
        "--deepspeed",
        default=None,
        metavar="CONFIG",
        help="DeepSpeed JSON config, or zero2, zero3, zero3_offload (shipped)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run_finetune)


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """The ``FinetuneSettings`` of parsed command-line arguments."""
    names = (
        "model", "data", "output_dir", "image_root", "model_max_length", "truncation", "skip_bad", "lora",
        "q_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "train_embeddings", "fix_vit", "train_resampler",
        "learning_rate", "weight_decay", "adam_beta2", "lr_scheduler", "warmup_ratio", "max_grad_norm", "epochs",
        "max_steps", "batch_size", "gradient_accumulation_steps", "group_by_length", "loss_vocab", "look_loss_weight",
        "look_loss_layer", "look_loss_heads", "dtype", "device",
        "gradient_checkpointing", "seed", "save_steps", "save_total_limit", "resume", "logging_steps", "dataloader_workers",
        "fsdp", "deepspeed",
    )  # fmt: skip
    values = {n: getattr(args, n) for n in names}
    if args.system is not None:
        values["system"] = args.system
    return FinetuneSettings(**values)


def run_finetune(args: argparse.Namespace) -> int:
    from ..finetune.deepspeed_config import DeepSpeedConfigError
    from ..finetune.deepspeed_engine import DeepSpeedUnavailableError
    from ..finetune.lora import QLoraUnavailableError
    from ..finetune.trainer import TrainingOutOfMemory, train

    try:
        result = train(settings_from_args(args), quiet=args.quiet)
    except (QLoraUnavailableError, NotImplementedError, DeepSpeedConfigError, DeepSpeedUnavailableError) as e:
        raise CliError(str(e)) from e
    except TrainingOutOfMemory as e:
        print(f"qwen-vl: error: {e}", file=sys.stderr)
        return 1
    if result.final_dir is not None:
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        print(
            f"trained {result.mode}: {result.global_step}/{result.total_steps} steps, last loss {last}, "
            f"{result.tokens_per_s:,.0f} tokens/s; weights in {result.final_dir}",
            file=sys.stdout,
        )
    return 0
