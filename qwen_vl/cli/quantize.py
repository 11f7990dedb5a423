"""``qwen-vl quantize``: write an Int4 GPTQ checkpoint (the official Qwen-VL-Chat-Int4 layout)
from a float one, calibrated on conversations."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a checkpoint to Int4 GPTQ",
        description="Quantize the decoder's linear layers to 4-bit GPTQ (AutoGPTQ's layout, as in "
        "Qwen-VL-Chat-Int4), calibrated on conversations in the official fine-tuning format or a "
        "'qwen-vl synth' folder. The vision tower, embeddings and lm_head stay in float.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="float checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="new directory for the Int4 checkpoint")
    p.add_argument("--calib", required=True, metavar="DATA", help="JSON/JSONL conversations or a synth folder")
    p.add_argument("--method", default="gptq", help="quantization method (gptq)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight (4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale and zero point, -1 = all")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing activation size (desc_act)")
    p.add_argument(
        "--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric zero points (default: on)"
    )
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, a fraction of its mean diagonal")
    p.add_argument("--calib-samples", type=int, default=128, help="conversations to calibrate on (default 128)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per calibration sample at most")
    p.add_argument("--image-root", metavar="DIR", help="folder the calibration pictures resolve against")
    p.add_argument("--dtype", default="auto", help="float tensors' dtype: auto (the checkpoint's), bfloat16, ...")
    p.add_argument("--device", default="auto", help="where blocks are calibrated: auto (CUDA if present), cpu, cuda")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample draw")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from ..quant.quantize import quantize_checkpoint

    result = quantize_checkpoint(
        args.model,
        args.out,
        args.calib,
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        damp=args.damp,
        calib_samples=args.calib_samples,
        max_length=args.max_length,
        image_root=args.image_root,
        dtype=args.dtype,
        device=args.device,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        seed=args.seed,
        quiet=args.quiet,
    )
    print(result)
    return 0
