"""Fine-tuning on CPU: our training loop against a plain Hugging Face ``Trainer`` run of
the same model, data and settings, LoRA and full, each in a fresh process.

    python bench/finetune_cpu.py [--quick] [--steps 6] [--threads N] [--json PATH]

Reports training tokens/s (real tokens of the batches over the time of the optimizer
steps, model loading and the final save excluded) and the peak resident memory of each
process (both end by writing their final weights).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOKENIZER_DIR = REPO.parent / "shared" / "golden" / "checkpoint"

CONFIGS = {
    "small-cpu": dict(
        hidden_size=512, num_attention_heads=8, kv_channels=64, num_hidden_layers=8, intermediate_size=2816,
        vocab_size=151936, seq_length=2048,
        visual=dict(image_size=448, patch_size=14, width=256, layers=4, heads=4, mlp_ratio=4.9231, output_dim=512),
    ),
    "tiny": dict(
        hidden_size=128, num_attention_heads=4, kv_channels=32, num_hidden_layers=2, intermediate_size=512,
        vocab_size=151936, seq_length=2048,
        visual=dict(image_size=448, patch_size=14, width=64, layers=1, heads=2, mlp_ratio=2.0, output_dim=128),
    ),
}  # fmt: skip
WORDS = "red blue green square circle triangle left right top bottom small large one two three".split()

WORKER = r"""
import json, resource, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from qwen_vl.finetune.settings import FinetuneSettings
settings = FinetuneSettings(**spec["settings"])
if spec["runner"] == "ours":
    from qwen_vl.finetune.trainer import train
    result = train(settings, quiet=True)
    tokens_per_s, losses = result.tokens_per_s, result.losses
else:
    from transformers import Trainer, TrainingArguments
    from qwen_vl.finetune.dataset import SupervisedDataset, collate
    from qwen_vl.finetune.model_setup import prepare_model
    from qwen_vl.finetune.validation import validate_data
    from qwen_vl.tokenizer import QWenTokenizer
    tok = QWenTokenizer.from_pretrained(settings.model)
    examples, _ = validate_data(settings.data, tok, model_max_length=settings.model_max_length)
    torch.manual_seed(settings.seed)
    tm = prepare_model(settings, torch.device("cpu"))
    data = SupervisedDataset(examples, int(tm.core.config.visual["image_size"]))
    counted = []
    def collator(batch):
        out = collate(batch, tok.eod_id)
        counted.append(int(out["attention_mask"].sum()))
        return out
    def full_logits_loss(outputs, labels, num_items_in_batch=None):
        # what the official model computes: logits at every position, then the shifted loss
        logits = outputs.logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    args = TrainingArguments(
        output_dir=spec["hf_dir"], per_device_train_batch_size=settings.batch_size, max_steps=settings.max_steps,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, adam_beta2=settings.adam_beta2,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=settings.max_grad_norm,
        save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, seed=settings.seed,
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    trainer = Trainer(model=tm.wrapped, args=args, train_dataset=data, data_collator=collator,
                      compute_loss_func=full_logits_loss)
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    tokens_per_s = sum(counted[: settings.max_steps * 1]) / seconds
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.save_model(spec["hf_dir"] + "/final")  # both runs end by writing their weights
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"tokens_per_s": tokens_per_s, "peak_rss_bytes": peak, "losses": losses}))
"""


def build_checkpoint(config_name: str, out: Path, seed: int = 0) -> Path:
    """Random weights of ``config_name`` in the official layout, with the golden tokenizer files."""
    import torch

    from qwen_vl import QWenConfig, QWenLMHeadModel
    from qwen_vl.model.saving import save_checkpoint

    torch.manual_seed(seed)
    model = QWenLMHeadModel(QWenConfig(**CONFIGS[config_name]))
    save_checkpoint(model, out, safe_serialization=True)
    for name in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json"):
        if (TOKENIZER_DIR / name).is_file():
            shutil.copy2(TOKENIZER_DIR / name, out / name)
    return out


def build_data(folder: Path, records: int, seed: int = 0) -> Path:
    """``records`` one-image conversations with ~30-word answers."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(records):
        name = f"img{i}.png"
        Image.new(
            "RGB", (rng.randint(64, 320), rng.randint(64, 320)), tuple(rng.randrange(256) for _ in range(3))
        ).save(folder / name)
        answer = " ".join(rng.choice(WORDS) for _ in range(30))
        rows.append(
            {
                "id": f"r{i}",
                "conversations": [
                    {"from": "user", "value": f"Picture 1: <img>{name}</img>\nDescribe the picture."},
                    {"from": "assistant", "value": answer},
                ],
            }
        )
    path = folder / "data.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def run_worker(runner: str, settings: dict[str, Any], threads: int, hf_dir: Path) -> dict[str, Any]:
    spec = json.dumps({"runner": runner, "settings": settings, "threads": threads, "hf_dir": str(hf_dir)})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", WORKER, spec], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{runner} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(config_name: str, steps: int, threads: int, work: Path) -> dict[str, Any]:
    checkpoint = build_checkpoint(config_name, work / "checkpoint")
    data = build_data(work / "data", records=steps * 2)
    rows = []
    for mode in ("lora", "full"):
        settings = dict(
            model=str(checkpoint), data=[str(data)], output_dir=str(work / f"ours-{mode}"), batch_size=2,
            max_steps=steps, learning_rate=1e-4, warmup_ratio=0.0, seed=0, lora=mode == "lora", lora_dropout=0.0,
            group_by_length=False, dtype="float32", device="cpu",
        )  # fmt: skip
        ours = run_worker("ours", settings, threads, work / "hf")
        hf = run_worker("hf", settings, threads, work / f"hf-{mode}")
        rows.append(
            {
                "mode": mode,
                "ours_tokens_per_s": ours["tokens_per_s"],
                "hf_tokens_per_s": hf["tokens_per_s"],
                "speedup": ours["tokens_per_s"] / hf["tokens_per_s"],
                "ours_peak_rss_gb": ours["peak_rss_bytes"] / 1e9,
                "hf_peak_rss_gb": hf["peak_rss_bytes"] / 1e9,
                "ours_losses": ours["losses"],
                "hf_losses": hf["losses"],
            }
        )
    return {
        "benchmark": "finetune_cpu",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config_name": config_name,
        "config": CONFIGS[config_name],
        "steps": steps,
        "batch_size": 2,
        "records": steps * 2,
        "threads": threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'mode':<6} {'ours tok/s':>11} {'HF tok/s':>9} {'speedup':>8} {'ours peak GB':>13} {'HF peak GB':>11}"]
    for r in result["rows"]:
        lines.append(
            f"{r['mode']:<6} {r['ours_tokens_per_s']:>11.1f} {r['hf_tokens_per_s']:>9.1f} {r['speedup']:>7.2f}x "
            f"{r['ours_peak_rss_gb']:>13.2f} {r['hf_peak_rss_gb']:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 2 steps (smoke test)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 6)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = p.parse_args(argv)
    steps = args.steps or (2 if args.quick else 6)
    with tempfile.TemporaryDirectory(prefix="qwen-vl-bench-") as tmp:
        result = run_benchmark("tiny" if args.quick else "small-cpu", steps, args.threads, Path(tmp))
    print(format_table(result))
    path = args.json
    if path is None and not args.quick:
        path = RESULTS_DIR / f"finetune_cpu-{dt.date.today().isoformat()}.json"
    if path is not None:
        from qwen_vl.model.saving import atomic_write

        text = json.dumps(result, indent=2) + "\n"
        atomic_write(path, lambda tmp_path: tmp_path.write_text(text, encoding="utf-8"))
        print(f"results: {path}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
