"""``qwen-vl bench``: decode speed, time to first token and peak memory of the engine
on synthetic prompts, per batch size."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..engine.decode_step import DECODE_MODES
from ..engine.engine import Engine
from ..engine.request import GenerationRequest
from ..engine.sampling import SamplingParams
from .errors import CliError
from .loading import check_device, load_model
from .options import DTYPES, ModelOptions
from .presets import PRESETS, build_random_model
from .progress import status

_TEXT_IDS = 151643  # ids below the first special token are ordinary text


@dataclass
class BenchRow:
    """Measurements of one batch size."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # submit -> first token (the batched prefill)
    decode_tok_s: float  # tokens after the first, all rows together, per second
    per_seq_tok_s: float  # the same for one row
    peak_memory_bytes: int
    memory_kind: str  # "rss" or "cuda"


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda"
    try:
        import resource
    except ImportError:  # not a Unix system
        return 0, "rss"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib * (1 if sys.platform == "darwin" else 1024)), "rss"


def synthetic_requests(
    model, batch_size: int, prompt_tokens: int, new_tokens: int, image: bool, seed: int = 0
) -> list[GenerationRequest]:
    """``batch_size`` greedy requests of random text ids (after one image span with
    ``image``) that never stop early: no end-of-sequence id, no stop words."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(batch_size):
        ids = torch.randint(0, min(_TEXT_IDS, cfg.vocab_size), (prompt_tokens,), generator=g).tolist()
        images = None
        if image:
            span = [cfg.image_start_id] + [cfg.image_pad_id] * cfg.num_image_queries + [cfg.image_end_id]
            ids = span + ids
            size = int(cfg.visual["image_size"])
            images = [torch.randn(3, size, size, generator=g)]  # distinct per request: no cache hits
        requests.append(
            GenerationRequest(
                prompt_ids=ids,
                sampling=SamplingParams(),
                max_new_tokens=new_tokens,
                eos_token_ids=[],
                images=images,
            )
        )
    return requests


def bench_batch(
    model, batch_size: int, prompt_tokens: int, new_tokens: int, image: bool = False, decode_mode: str = "auto"
) -> BenchRow:
    """Run one batch of ``batch_size`` requests through a fresh engine and time it."""
    device = model.lm_head.weight.device
    requests = synthetic_requests(model, batch_size, prompt_tokens, new_tokens, image, seed=batch_size)
    length = len(requests[0].prompt_ids)
    engine = Engine(
        model, None, max_batch_size=batch_size, max_seq_len=length + new_tokens + 1, decode_mode=decode_mode
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    handles = [engine.submit(r) for r in requests]  # all queued before the loop starts: one prefill
    engine.start()
    try:
        next(iter(handles[0].stream()))  # all rows get their first token in the same prefill
        first = time.perf_counter()
        for h in handles:
            h.result()
        end = time.perf_counter()
    finally:
        engine.stop()
    failed = [h.error for h in handles if h.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"benchmark request failed: {failed[0]}")
    peak, kind = _peak_memory(device)
    decode_s = max(end - first, 1e-9)
    steps = new_tokens - 1
    return BenchRow(
        batch_size, length, new_tokens, first - start, batch_size * steps / decode_s, steps / decode_s, peak, kind
    )


def run_bench(
    model,
    batch_sizes: Sequence[int] = (1, 4, 16),
    new_tokens: int = 64,
    prompt_tokens: int = 128,
    image: bool = False,
    on_row: Callable[[BenchRow], object] | None = None,
    decode_mode: str = "auto",
) -> list[BenchRow]:
    """Measure each batch size in turn (after one short warm-up run)."""
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 to time decoding, got {new_tokens}")
    if prompt_tokens < 1 or any(b < 1 for b in batch_sizes):
        raise ValueError("--prompt-tokens and every batch size must be at least 1")
    with torch.no_grad():
        bench_batch(model, 1, min(prompt_tokens, 8), 2, image, decode_mode)  # warm-up (and compilation)
        rows = []
        for b in batch_sizes:
            row = bench_batch(model, b, prompt_tokens, new_tokens, image, decode_mode)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


HEADER = f"{'batch':>5} {'prompt':>6} {'new':>5} {'ttft_ms':>9} {'decode_tok/s':>12} {'tok/s/seq':>10} {'peak_mem':>12}"


def format_row(row: BenchRow) -> str:
    mem = f"{row.peak_memory_bytes / 2**20:.0f} MiB {row.memory_kind}"
    return (
        f"{row.batch_size:>5} {row.prompt_tokens:>6} {row.new_tokens:>5} {row.ttft_s * 1e3:>9.1f} "
        f"{row.decode_tok_s:>12.1f} {row.per_seq_tok_s:>10.1f} {mem:>12}"
    )


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers separated by commas, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def load_bench_model(model_dir: str | None, preset: str | None, device: str, dtype: str | None, quiet: bool):
    """The checkpoint at ``model_dir``, or a random-weight model of ``preset``."""
    if (model_dir is None) == (preset is None):
        raise CliError("give exactly one of --model DIR and --random-config PRESET")
    if model_dir is not None:
        return load_model(ModelOptions(model_dir, device, dtype, quiet=quiet))
    check_device(device)
    name = dtype if dtype not in (None, "auto") else ("float32" if device == "cpu" else "bfloat16")
    with status(f"building random {preset} ({name}, {device})", quiet=quiet):
        return build_random_model(preset, device, getattr(torch, name))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure decode speed, time to first token and memory")
    source = p.add_argument_group("model (one of)")
    source.add_argument("--model", default=None, metavar="DIR", help="local checkpoint directory")
    source.add_argument("--random-config", choices=sorted(PRESETS), default=None, help="random weights of a preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 on CPU, bfloat16/auto on GPU")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 4, 16], help="comma-separated, e.g. 1,4,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128, help="text tokens per prompt")
    p.add_argument("--image", action="store_true", help="put one (random) image before each prompt")
    p.add_argument(
        "--decode-mode", choices=DECODE_MODES, default="auto", help="decode step (auto: eager; compile is opt-in)"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    model = load_bench_model(args.model, args.random_config, args.device, args.dtype, args.quiet)
    if not args.json:
        print(HEADER, flush=True)

    def show(row: BenchRow) -> None:
        print(json.dumps(asdict(row)) if args.json else format_row(row), flush=True)

    run_bench(
        model,
        args.batch_sizes,
        args.new_tokens,
        args.prompt_tokens,
        args.image,
        on_row=show,
        decode_mode=args.decode_mode,
    )
    return 0
