"""Load test and benchmark of ``qwen-vl serve``: throughput and latency at several
concurrencies, against the same requests run one at a time through ``model.chat()``
in the same process.

The server runs as its own process (``qwen-vl serve`` on 127.0.0.1, as it is deployed);
an ``httpx`` async client here sends ``--requests`` chat requests at each concurrency
(greedy, ``--max-tokens`` each, every ``--image-every``-th one with a 448x448 PNG data
URI). The run fails unless every request was answered 200 (nothing lost, no 5xx).
Reported per concurrency: requests/s, generated tokens/s, p50 / p99 latency, and the
server process' RSS growth over the phase (its memory must not keep growing). The
server is stopped before the ``chat()`` baseline runs, so the two never share the CPU.

    python bench/server_bench.py [--model DIR] [--requests 1000] [--concurrency 1,8,32]
                                 [--max-tokens 8] [--image-every 4] [--baseline-requests N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

import qwen_vl

GOLDEN_CHECKPOINT = Path(__file__).resolve().parent.parent.parent / "shared" / "golden" / "checkpoint"


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of process ``pid`` (Linux ``/proc``; 0 elsewhere)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def make_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (448, 448, 3), dtype=np.uint8))


def png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(n: int, image_every: int) -> list[tuple[str, Image.Image | None]]:
    """``n`` (question, image or None) pairs; a few distinct pictures, reused."""
    pictures = [make_image(s) for s in range(4)] if image_every else []
    out = []
    for i in range(n):
        image = pictures[i % len(pictures)] if image_every and i % image_every == 0 else None
        out.append((f"Question {i}: what do you see, and why?", image))
    return out


def chat_body(model: str, question: str, uri: str | None, max_tokens: int) -> dict[str, Any]:
    content: Any = question
    if uri is not None:
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def load_phase(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Send every body with at most ``concurrency`` in flight; statuses, latencies, tokens."""
    gate = asyncio.Semaphore(concurrency)
    statuses: list[int] = []
    latencies: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            r = await client.post(f"{url}/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            statuses.append(r.status_code)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, b) for b in bodies))
        wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "ok": statuses.count(200),
        "errors_5xx": sum(s >= 500 for s in statuses),
        "other_status": sorted({s for s in statuses if s != 200}),
        "wall_s": wall,
        "requests_per_s": len(bodies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 0.99),
    }


def chat_baseline(model, tokenizer, work: list[tuple[str, Image.Image | None]], max_tokens: int) -> dict[str, Any]:
    """The same requests one at a time through ``model.chat()`` (greedy)."""
    latencies = []
    start = time.perf_counter()
    for question, image in work:
        query, images = question, None
        if image is not None:
            query = tokenizer.from_list_format([{"image": "picture.png"}, {"text": question}])
            images = {"picture.png": image}
        t = time.perf_counter()
        model.chat(tokenizer, query, history=None, images=images, do_sample=False, max_new_tokens=max_tokens)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {"requests": len(work), "requests_per_s": len(work) / wall, "tokens_per_s": len(work) * max_tokens / wall,
            "p50_s": statistics.median(latencies), "p99_s": percentile(latencies, 0.99)}  # fmt: skip


def start_server(args: argparse.Namespace, name: str, levels: list[int]) -> tuple[subprocess.Popen, str]:
    """``qwen-vl serve`` in a child process on a free port; returns it and its ``/v1`` URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "qwen_vl.cli", "serve", "--model", args.model, "--port", str(port), "--quiet",
           "--device", args.device, "--served-model-name", name, "--max-seq-len", str(args.max_seq_len),
           "--max-batch-size", str(max(levels)), "--max-queue", str(2 * max(levels)),
           "--max-tokens", str(args.max_tokens)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {proc.stderr.read()}")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(GOLDEN_CHECKPOINT), help="checkpoint folder (default: the golden tiny one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--image-every", type=int, default=4, help="every k-th request carries an image (0: none)")
    p.add_argument(
        "--baseline-requests",
        type=int,
        default=None,
        help="requests run through chat() for the baseline (default: the same --requests)",
    )
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    name = Path(args.model).name
    work = workload(args.requests, args.image_every)
    uris = {id(img): png_uri(img) for _, img in work if img is not None}
    bodies = [chat_body(name, q, uris.get(id(img)) if img is not None else None, args.max_tokens) for q, img in work]

    proc, url = start_server(args, name, levels)
    phases = []
    try:
        asyncio.run(load_phase(url, bodies[: min(len(bodies), 16)], max(levels)))  # warm-up
        for level in levels:
            before = rss_bytes(proc.pid)
            phase = asyncio.run(load_phase(url, bodies, level))
            phase["rss_growth_mib"] = (rss_bytes(proc.pid) - before) / 2**20
            phases.append(phase)
            print(f"concurrency {level:3d}: {phase['ok']}/{phase['requests']} ok, {phase['requests_per_s']:.1f} req/s, "
                  f"{phase['tokens_per_s']:.1f} tok/s, p50 {phase['p50_s'] * 1000:.0f} ms, "
                  f"p99 {phase['p99_s'] * 1000:.0f} ms, rss +{phase['rss_growth_mib']:.1f} MiB", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(120)
    tokenizer = qwen_vl.QWenTokenizer.from_pretrained(args.model)
    model = qwen_vl.QWenLMHeadModel.from_pretrained(args.model, torch_dtype=torch.float32, device=args.device)
    baseline = chat_baseline(model, tokenizer, work[: args.baseline_requests or args.requests], args.max_tokens)
    print(f"chat() one at a time: {baseline['requests_per_s']:.1f} req/s, p50 {baseline['p50_s'] * 1000:.0f} ms")
    for phase in phases:
        phase["speedup_vs_chat"] = phase["requests_per_s"] / baseline["requests_per_s"]
        print(f"concurrency {phase['concurrency']:3d}: {phase['speedup_vs_chat']:.2f}x chat() one at a time")
    result = {"model": name, "max_tokens": args.max_tokens, "image_every": args.image_every, "phases": phases,
              "chat_baseline": baseline, "client_torch_threads": torch.get_num_threads(),
              "machine": f"{os.cpu_count()} CPUs, {args.device}, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    lost = [ph for ph in phases if ph["ok"] != ph["requests"] or ph["errors_5xx"]]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    if lost:
        raise AssertionError(f"requests lost or failed: {lost}")
    return result


if __name__ == "__main__":
    main()
