"""CPU benchmark of the engine against an HF-style eager loop (``baseline_hf_loop``),
both on the same randomly initialised (seeded) model in one process.

Measures decode tokens/s at batch 1, throughput (generated tokens/s over all rows)
for batches of requests with mixed prompt lengths, and time to first token for a
request with one 448x448 image. Every request generates exactly ``--new-tokens``
tokens (no end-of-sequence), and the baseline's greedy tokens must equal the
engine's at batch 1, so both do the same work.

    python bench/engine_cpu.py [--quick] [--batch-sizes 1,4,16] [--new-tokens 64] [--json PATH]
                               [--repeats 2] [--threads N]

Results go to ``bench/results/engine_cpu-<date>.json`` (``--quick``: only with ``--json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_hf_loop import baseline_generate  # noqa: E402

from qwen_vl.config import QWenConfig  # noqa: E402
from qwen_vl.engine.decode_step import DECODE_MODES  # noqa: E402
from qwen_vl.engine.engine import Engine  # noqa: E402
from qwen_vl.engine.request import GenerationRequest  # noqa: E402
from qwen_vl.modeling import QWenLMHeadModel  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: The documented scaled-down model: Qwen-VL's layout at a size two CPU cores can run.
CONFIGS: dict[str, dict[str, Any]] = {
    "small-cpu": dict(
        hidden_size=512,
        num_attention_heads=8,
        kv_channels=64,
        num_hidden_layers=8,
        intermediate_size=2816,
        vocab_size=151936,
        seq_length=2048,
        visual=dict(image_size=448, patch_size=14, width=256, layers=4, heads=4, mlp_ratio=4.9231, output_dim=512),
    ),
    "tiny": dict(
        hidden_size=128,
        num_attention_heads=4,
        kv_channels=32,
        num_hidden_layers=2,
        intermediate_size=512,
        vocab_size=151936,
        seq_length=2048,
        visual=dict(image_size=448, patch_size=14, width=64, layers=1, heads=2, mlp_ratio=2.0, output_dim=128),
    ),
}
GOALS = {"decode_b1": 3.0, "throughput_b16": 10.0}
TEXT_IDS = (1000, 150000)  # plain-token id range: no end-of-sequence, no image tags
PROMPT_LENGTHS = (32, 12, 48, 20, 40, 8, 56, 28)  # cycled to mix lengths; batch 1 gets the first
IMAGE_TEXT_TOKENS = 20


def build_model(name: str, seed: int) -> QWenLMHeadModel:
    """A float32 model of config ``name`` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return QWenLMHeadModel(QWenConfig(**CONFIGS[name])).eval()


def random_prompts(lengths: Sequence[int], seed: int) -> list[list[int]]:
    """Prompts of plain text ids with the given lengths."""
    rng = random.Random(seed)
    return [[rng.randrange(*TEXT_IDS) for _ in range(n)] for n in lengths]


def request(prompt: list[int], new_tokens: int, images: list | None = None) -> GenerationRequest:
    """A greedy request for exactly ``new_tokens`` tokens (no end-of-sequence id)."""
    return GenerationRequest(prompt_ids=prompt, max_new_tokens=new_tokens, eos_token_ids=[], images=images)


def paired_best(
    repeats: int, ours: Callable[[], dict[str, Any]], base: Callable[[], dict[str, Any]], key: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``ours`` and ``base`` alternately ``repeats`` times; keep each one's run with the lowest ``key``.

    Alternating spreads load from other processes over both sides.
    """
    pairs = [(ours(), base()) for _ in range(max(repeats, 1))]
    return min((p[0] for p in pairs), key=lambda r: r[key]), min((p[1] for p in pairs), key=lambda r: r[key])


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so host clocks time it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_on_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Submit all prompts to ``engine`` at once and run them to the end; decode speed counts
    only the steps after the first (which prefills, picks the first token and decodes once)."""
    sync(engine.device)
    start = time.perf_counter()
    handles = [engine.submit(request(p, new_tokens)) for p in prompts]
    engine.step()  # prefill, first token, one decode step
    after_first_step = time.perf_counter()
    done_in_first = sum(len(h.token_ids) for h in handles)
    engine.run_until_idle()
    sync(engine.device)
    end = time.perf_counter()
    failed = [h.error for h in handles if h.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"benchmark request failed: {failed[0]}")
    generated = sum(len(h.token_ids) for h in handles)
    return {
        "tokens": [h.token_ids for h in handles],
        "total_s": end - start,
        "decode_s": end - after_first_step,
        "decode_tokens": generated - done_in_first,
    }


def engine_batch(
    model, prompts: list[list[int]], new_tokens: int, max_seq_len: int, decode_mode: str = "auto"
) -> dict[str, Any]:
    """``run_on_engine`` on a new engine sized for ``prompts``."""
    engine = Engine(model, max_batch_size=len(prompts), max_seq_len=max_seq_len, decode_mode=decode_mode)
    return run_on_engine(engine, prompts, new_tokens)


def baseline_batch(model, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """The baseline on the same prompts, timed like ``engine_batch``."""
    out = baseline_generate(model, prompts, new_tokens)
    return {
        "tokens": out.tokens,
        "total_s": out.total_s,
        "decode_s": out.total_s - out.first_token_s,
        "decode_tokens": len(prompts) * (new_tokens - 1),
    }


def image_prompt(config: QWenConfig, text_tokens: int, seed: int) -> list[int]:
    """``<img>`` + 256 pads + ``</img>`` followed by ``text_tokens`` plain tokens."""
    span = [config.image_start_id] + [config.image_pad_id] * config.num_image_queries + [config.image_end_id]
    return span + random_prompts([text_tokens], seed)[0]


def random_image(size: int, seed: int) -> Image.Image:
    """An RGB image of uniform random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def first_token(model, runner: str, prompt: list[int], image: Image.Image) -> dict[str, Any]:
    """Seconds to the first token of one image request (image preprocessing included)."""
    if runner == "engine":
        engine = Engine(model, max_batch_size=1, max_seq_len=len(prompt) + 1)
        start = time.perf_counter()
        (handle,) = engine.generate([request(prompt, 1, images=[image])])
        return {"ttft_s": time.perf_counter() - start, "token": handle.token_ids[0]}
    out = baseline_generate(model, [prompt], 1, images=[image])
    return {"ttft_s": out.first_token_s, "token": out.tokens[0][0]}


def machine_info() -> dict[str, Any]:
    model_name = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model_name = names[0] if names else ""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model_name or platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def run_benchmark(
    config_name: str, batch_sizes: Sequence[int], new_tokens: int, repeats: int, decode_mode: str = "auto"
) -> dict[str, Any]:
    """All measurements; raises AssertionError if the batch-1 greedy tokens differ."""
    seed = 0
    model = build_model(config_name, seed)
    max_seq_len = max(PROMPT_LENGTHS) + new_tokens
    warm = random_prompts([8, 4], seed)
    engine_batch(model, warm, 2, max_seq_len, decode_mode)
    engine_batch(model, warm[:1], 2, max_seq_len, decode_mode)
    baseline_generate(model, warm, 2)

    throughput, decode = [], {}
    for b in batch_sizes:
        lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(b)]
        prompts = random_prompts(lengths, seed + b)
        ours, base = paired_best(
            repeats,
            lambda p=prompts: engine_batch(model, p, new_tokens, max_seq_len, decode_mode),
            lambda p=prompts: baseline_batch(model, p, new_tokens),
            "total_s",
        )
        rows_equal = sum(a == c for a, c in zip(ours["tokens"], base["tokens"]))
        if b == 1:
            assert rows_equal == 1, "baseline and engine disagree on greedy tokens at batch 1"
            decode = {
                "prompt_tokens": lengths[0],
                "new_tokens": new_tokens,
                "ours_tok_s": ours["decode_tokens"] / ours["decode_s"],
                "baseline_tok_s": base["decode_tokens"] / base["decode_s"],
            }
        throughput.append(
            {
                "batch": b,
                "prompt_lengths": lengths,
                "new_tokens": new_tokens,
                "ours_tok_s": b * new_tokens / ours["total_s"],
                "baseline_tok_s": b * new_tokens / base["total_s"],
                "rows_equal": rows_equal,
            }
        )

    config = model.config
    size = int(config.visual["image_size"])
    image_ids = image_prompt(config, IMAGE_TEXT_TOKENS, seed + 2)
    pictures = iter(range(100, 100 + 2 * max(repeats, 1)))  # a new picture each run: no feature-cache hits
    ours, base = paired_best(
        repeats,
        lambda: first_token(model, "engine", image_ids, random_image(size, next(pictures))),
        lambda: first_token(model, "baseline", image_ids, random_image(size, next(pictures))),
        "ttft_s",
    )
    ttft = {
        "image_size": size,
        "text_tokens": IMAGE_TEXT_TOKENS,
        "prompt_tokens": len(image_ids),
        "ours_s": ours["ttft_s"],
        "baseline_s": base["ttft_s"],
    }

    ratios = {
        "decode_b1": decode["ours_tok_s"] / decode["baseline_tok_s"],
        **{f"throughput_b{t['batch']}": t["ours_tok_s"] / t["baseline_tok_s"] for t in throughput},
        "ttft_speedup": ttft["baseline_s"] / ttft["ours_s"],
        # Batched engine against the baseline serving one request at a time.
        **{
            f"throughput_b{t['batch']}_vs_serial_baseline": t["ours_tok_s"] / throughput[0]["baseline_tok_s"]
            for t in throughput[1:]
        },
    }
    return {
        "benchmark": "engine_cpu",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config_name": config_name,
        "config": CONFIGS[config_name],
        "dtype": "float32",
        "decode_mode": decode_mode,
        "seed": seed,
        "repeats": repeats,
        "machine": machine_info(),
        "decode_b1": decode,
        "throughput": throughput,
        "ttft_image": ttft,
        "ratios": ratios,
        "goals": {k: {"target": v, "met": ratios[k] >= v} for k, v in GOALS.items() if k in ratios},
    }


def format_table(result: dict[str, Any]) -> str:
    """Ours vs baseline, one line per measurement, then the goals."""
    ratios = result["ratios"]
    d, f = result["decode_b1"], result["ttft_image"]
    measured = [("decode tok/s, batch 1", d["ours_tok_s"], d["baseline_tok_s"], ratios["decode_b1"], ".1f")]
    for t in result["throughput"]:
        b = t["batch"]
        measured.append(
            (f"throughput tok/s, batch {b}", t["ours_tok_s"], t["baseline_tok_s"], ratios[f"throughput_b{b}"], ".1f")
        )
    measured.append(("TTFT s, 1 image + 20 tokens", f["ours_s"], f["baseline_s"], ratios["ttft_speedup"], ".3f"))
    rows = [("measure", "ours", "baseline", "ratio")]
    rows += [(name, format(a, fmt), format(b, fmt), f"{r:.2f}x") for name, a, b, r, fmt in measured]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    for t in result["throughput"][1:]:
        ratio = ratios[f"throughput_b{t['batch']}_vs_serial_baseline"]
        lines.append(f"ours at batch {t['batch']} vs baseline one request at a time: {ratio:.2f}x")
    for name, goal in result["goals"].items():
        lines.append(f"goal {name} >= {goal['target']:g}x: {'met' if goal['met'] else 'MISSED'}")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 4 new tokens, batches 1,2 (smoke test)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default 1,4,16; 1 is always run)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="runs per measurement, best kept (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    p.add_argument(
        "--decode-mode", choices=DECODE_MODES, default="auto", help="engine decode step: auto, eager or compile"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and write the JSON; returns the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.quick else "1,4,16")).split(",")]
    batch_sizes = sorted(set(batch_sizes) | {1})
    new_tokens = args.new_tokens or (4 if args.quick else 64)
    if new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode speed needs a token after the first)")
    result = run_benchmark(
        "tiny" if args.quick else "small-cpu",
        batch_sizes,
        new_tokens,
        args.repeats or (1 if args.quick else 2),
        args.decode_mode,
    )
    print(format_table(result))
    path = args.json
    if path is None and not args.quick:
        path = RESULTS_DIR / f"engine_cpu-{dt.date.today().isoformat()}.json"
    if path is not None:
        write_json(result, path)
        print(f"results: {path}")
    return result


if __name__ == "__main__":
    main()
