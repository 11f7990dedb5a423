"""GPU benchmark of the engine at Qwen-VL-Chat's sizes (random weights, bfloat16).

In one process, on one model:

- **correctness**: a small float32 model's greedy tokens from the eager and the
  compiled (CUDA graph) decode step, checked against the same model's CPU logits;
- **throughput** per batch size for each decode mode (eager, compile), one
  engine per mode reused across batches; each batch runs once untimed (compilation,
  graph recording) and once timed;
- **baseline**: the HF-style eager loop (``baseline_hf_loop.py``) on the same
  prompts, for the ratios;
- **TTFT**: one 448x448 image + 20 text tokens, engine vs baseline;
- **long decode**: batch 1 after an image (258 tokens), generating each of
  ``--long`` tokens (Qwen-VL's published table: 1,792 and 7,934), with peak memory.

    python bench/engine_gpu.py [--batch-sizes 1,16,64] [--new-tokens 128] [--long 1792,7934]
                               [--json PATH] [--quick]

``--quick`` runs the same code on the tiny preset (on the CPU when no GPU is
present): what ``tests/test_bench_smoke.py`` runs. Sections write the JSON as they
finish, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_hf_loop import baseline_generate  # noqa: E402
from engine_cpu import (  # noqa: E402
    image_prompt,
    random_image,
    random_prompts,
    request,
    run_on_engine,
    sync,
    write_json,
)

from qwen_vl.cli.presets import build_random_model  # noqa: E402
from qwen_vl.engine.engine import Engine  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPT_LENGTHS = (32, 12, 48, 20, 40, 8, 56, 28)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device_info(device: torch.device) -> dict[str, Any]:
    info = {"torch_version": torch.__version__, "python_version": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def timed_batch(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """``run_on_engine`` with its rates: all generated tokens and the decode steps' tokens per second."""
    run = run_on_engine(engine, prompts, new_tokens)
    generated = sum(len(t) for t in run["tokens"])
    return {
        "tokens": run["tokens"],
        "tok_s": generated / run["total_s"],
        "decode_tok_s": run["decode_tokens"] / max(run["decode_s"], 1e-9),
        "total_s": run["total_s"],
    }


def check_correctness(device: torch.device, modes: Sequence[str], new_tokens: int = 24) -> dict[str, Any]:
    """Greedy tokens of a tiny float32 model on ``device``, per decode mode, checked against
    the same model's logits on the CPU: each chosen token must be the CPU's argmax or within
    ``tolerance`` of it (random weights give near-ties, where exact tokens may differ)."""
    tolerance = 1e-3
    prompts = random_prompts([9, 31, 4], 7)
    cpu_model = build_random_model("tiny", "cpu", torch.float32, seed=3)
    model = build_random_model("tiny", str(device), torch.float32, seed=3)
    out: dict[str, Any] = {"rows": len(prompts), "new_tokens": new_tokens, "tolerance": tolerance}
    for mode in modes:
        engine = Engine(model, max_batch_size=3, max_seq_len=64, decode_mode=mode)
        handles = engine.generate([request(p, new_tokens) for p in prompts])
        gap = 0.0
        for prompt, handle in zip(prompts, handles):
            with torch.no_grad():
                logits = cpu_model(torch.tensor([prompt + handle.token_ids])).logits[0, len(prompt) - 1 : -1]
            chosen = logits.gather(1, torch.tensor(handle.token_ids)[:, None])[:, 0]  # (new,)
            gap = max(gap, float((logits.max(dim=-1).values - chosen).max()))
        out[f"{mode}_max_logit_gap"] = gap
        out[f"{mode}_compiled"] = engine.decode_step.compiled
    out["ok"] = all(out[f"{m}_max_logit_gap"] <= tolerance for m in modes)
    return out


def throughput(model, batch_sizes: Sequence[int], new_tokens: int, modes: Sequence[str]) -> dict[str, Any]:
    """tok/s per decode mode and batch size, and the baseline at batch 1 and the largest batch."""
    device = model.lm_head.weight.device
    rows: list[dict[str, Any]] = []
    first_tokens: dict[str, list[int]] = {}
    max_len = max(PROMPT_LENGTHS) + new_tokens + 1
    for mode in modes:
        engine = Engine(model, max_batch_size=max(batch_sizes), max_seq_len=max_len, decode_mode=mode)
        for b in batch_sizes:
            prompts = random_prompts([PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(b)], b)
            warm_start = time.perf_counter()
            timed_batch(engine, prompts, new_tokens)  # compilation and graph recording happen here
            warm_s = time.perf_counter() - warm_start
            run = timed_batch(engine, prompts, new_tokens)
            if b == 1:
                first_tokens[mode] = run["tokens"][0]
            rows.append(
                {"mode": mode, "batch": b, "tok_s": run["tok_s"], "decode_tok_s": run["decode_tok_s"], "warm_s": warm_s}
            )
            print(f"  {mode:8s} batch {b:3d}: {run['tok_s']:9.1f} tok/s (first run {warm_s:.1f} s)", flush=True)
        rows[-1]["compiled"] = engine.decode_step.compiled
    baseline = []
    for b in sorted({1, max(batch_sizes)}):
        prompts = random_prompts([PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(b)], b)
        baseline_generate(model, prompts[:1], 2)  # warm-up
        sync(device)
        out = baseline_generate(model, prompts, new_tokens)
        sync(device)
        baseline.append({"batch": b, "tok_s": b * new_tokens / out.total_s})
        if b == 1:
            first_tokens["baseline"] = out.tokens[0]
        print(f"  baseline batch {b:3d}: {baseline[-1]['tok_s']:9.1f} tok/s", flush=True)
    reference = first_tokens.get("eager")
    agree = {k: sum(a == c for a, c in zip(v, reference)) for k, v in first_tokens.items()} if reference else {}
    return {"new_tokens": new_tokens, "rows": rows, "baseline": baseline, "batch1_tokens_equal_to_eager": agree}


def ttft(model, repeats: int = 3) -> dict[str, Any]:
    """Seconds to the first token of one image request (best of ``repeats``, new image each time)."""
    device = model.lm_head.weight.device
    size = int(model.config.visual["image_size"])
    ids = image_prompt(model.config, 20, 2)
    engine = Engine(model, max_batch_size=1, max_seq_len=len(ids) + 1, decode_mode="eager")
    ours, base = [], []
    for i in range(repeats + 1):  # the first of each is a warm-up
        sync(device)
        start = time.perf_counter()
        engine.generate([request(ids, 1, images=[random_image(size, 100 + i)])])
        sync(device)
        ours.append(time.perf_counter() - start)
        base.append(baseline_generate(model, [ids], 1, images=[random_image(size, 200 + i)]).first_token_s)
    return {"prompt_tokens": len(ids), "ours_s": min(ours[1:]), "baseline_s": min(base[1:])}


def long_decode(model, lengths: Sequence[int], mode: str) -> list[dict[str, Any]]:
    """Batch 1 after one image span (258 tokens): tok/s over ``n`` new tokens, and peak
    memory, on one engine sized for the longest (warmed up once over every length bucket)."""
    device = model.lm_head.weight.device
    cfg = model.config
    size = int(cfg.visual["image_size"])
    span = [cfg.image_start_id] + [cfg.image_pad_id] * cfg.num_image_queries + [cfg.image_end_id]
    engine = Engine(model, max_batch_size=1, max_seq_len=len(span) + max(lengths), decode_mode=mode)
    engine.generate([request(span, max(lengths), images=[random_image(size, 300)])])  # warm-up
    rows = []
    for i, n in enumerate(lengths):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        (handle,) = engine.generate([request(span, n, images=[random_image(size, 301 + i)])])
        sync(device)
        seconds = time.perf_counter() - start
        peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        rows.append({"context_tokens": len(span), "new_tokens": len(handle.token_ids), "tok_s": n / seconds,
                     "seconds": seconds, "peak_gib": peak, "cache_slots": engine.max_seq_len, "mode": mode})  # fmt: skip
        print(f"  long {n:5d} tokens ({mode}): {n / seconds:.1f} tok/s, peak {peak} GiB", flush=True)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")} | {1})
    long_lengths = [int(n) for n in args.long.split(",") if n]
    preset = "tiny" if args.quick else args.config
    modes = ("eager", "compile") if device.type == "cuda" else ("eager",)  # CPU: compiling does not pay
    result: dict[str, Any] = {
        "benchmark": "engine_gpu",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config_name": preset,
        "dtype": args.dtype,
        "machine": device_info(device),
    }

    def save() -> None:
        if args.json is not None:
            write_json(result, args.json)

    print("correctness (tiny float32 model, greedy tokens vs CPU logits)", flush=True)
    result["correctness"] = check_correctness(device, modes)
    print(f"  {result['correctness']}", flush=True)
    save()
    model = build_random_model(preset, str(device), DTYPES[args.dtype], seed=0)
    with torch.no_grad():
        print(f"throughput ({preset}, {args.dtype}, {args.new_tokens} new tokens per request)", flush=True)
        result["throughput"] = throughput(model, batch_sizes, args.new_tokens, modes)
        save()
        print("time to first token, one image + 20 tokens", flush=True)
        result["ttft_image"] = ttft(model, repeats=1 if args.quick else 3)
        save()
        if long_lengths:
            print("long decode after an image", flush=True)
            result["long_decode"] = long_decode(model, long_lengths, modes[-1])
            save()
    result["summary"] = summarize(result)
    save()
    return result


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Ratios against the baseline and between decode modes."""
    t = result["throughput"]
    by = {(r["mode"], r["batch"]): r["tok_s"] for r in t["rows"]}
    base = {r["batch"]: r["tok_s"] for r in t["baseline"]}
    top = max(base)
    out = {}
    modes = sorted({r["mode"] for r in t["rows"]})
    for mode in modes:
        out[f"{mode}_b1_vs_baseline"] = by[(mode, 1)] / base[1]
        out[f"{mode}_b{top}_vs_baseline_b{top}"] = by[(mode, top)] / base[top]
        out[f"{mode}_b{top}_vs_baseline_b1"] = by[(mode, top)] / base[1]
    if "compile" in modes:
        out["compile_vs_eager_b1"] = by[("compile", 1)] / by[("eager", 1)]
    out["ttft_speedup"] = result["ttft_image"]["baseline_s"] / result["ttft_image"]["ours_s"]
    return out


def format_table(result: dict[str, Any]) -> str:
    t = result["throughput"]
    lines = [f"{'mode':10s} {'batch':>5s} {'tok/s':>10s}"]
    lines += [f"{r['mode']:10s} {r['batch']:5d} {r['tok_s']:10.1f}" for r in t["rows"]]
    lines += [f"{'baseline':10s} {r['batch']:5d} {r['tok_s']:10.1f}" for r in t["baseline"]]
    f = result["ttft_image"]
    lines.append(f"TTFT s (image + 20 tokens): ours {f['ours_s']:.3f}, baseline {f['baseline_s']:.3f}")
    for r in result.get("long_decode", []):
        lines.append(f"long decode {r['new_tokens']} tokens: {r['tok_s']:.1f} tok/s, peak {r['peak_gib']} GiB")
    lines += [f"{k}: {v:.2f}x" for k, v in result["summary"].items()]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen-vl-chat", help="random-weight preset (default qwen-vl-chat)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--long", default="1792,7934", help="comma-separated long-decode lengths ('' to skip)")
    p.add_argument("--json", type=Path, default=None, help="results file (default bench/results/engine_gpu-DATE.json)")
    p.add_argument("--quick", action="store_true", help="tiny preset, few tokens (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.new_tokens, args.long, args.dtype = "1,2", 4, "8", "float32"
    if args.json is None and not args.quick:
        args.json = RESULTS_DIR / f"engine_gpu-{dt.date.today().isoformat()}.json"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every section, print the table; returns the results."""
    result = run(parse_args(argv))
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
