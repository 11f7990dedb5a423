"""The training loop end to end on the golden checkpoint: it learns, its outputs load,
a killed run resumes exactly, and two gloo processes equal one."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import qwen_vl
from qwen_vl.cli import main
from qwen_vl.finetune import trainer as trainer_module
from qwen_vl.finetune.loss_log import read_loss_csv
from qwen_vl.finetune.model_setup import prepare_model
from qwen_vl.finetune.settings import FinetuneSettings
from qwen_vl.finetune.trainer import TrainingOutOfMemory, train

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is in the picture?"
SCENES = {"red.png": ("red", "square", "A red square."), "blue.png": ("blue", "circle", "A blue circle.")}


def make_data(folder: Path, copies: int = 1) -> Path:
    """Two pictures, one question each; ``copies`` repeats the records (distinct ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for name, (color, shape, answer) in SCENES.items():
        image = Image.new("RGB", (96, 96), "white")
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)([20, 20, 76, 76], fill=color)
        image.save(folder / name)
        for i in range(copies):
            user = {"from": "user", "value": f"Picture 1: <img>{name}</img>\n{QUESTION}"}
            records.append({"id": f"{name}-{i}", "conversations": [user, {"from": "assistant", "value": answer}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def settings(checkpoint_dir, data: Path, out: Path, **kw) -> FinetuneSettings:
    base = dict(model=checkpoint_dir, data=[data], output_dir=out, seed=7, warmup_ratio=0.0, logging_steps=1)
    return FinetuneSettings(**{**base, **kw})


def ask(model, tokenizer, folder: Path, name: str) -> str:
    query = tokenizer.from_list_format([{"image": name}, {"text": QUESTION}])
    image = Image.open(folder / name)
    response, _ = model.chat(tokenizer, query, history=None, images={name: image}, do_sample=False)
    return response


@pytest.mark.slow
def test_full_finetune_learns_the_answers_and_saves_a_loadable_model(checkpoint_dir, tokenizer, tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    result = train(
        settings(checkpoint_dir, data, out, batch_size=2, max_steps=30, learning_rate=2e-3, lr_scheduler="constant"),
        quiet=True,
    )
    assert result.mode == "full" and result.global_step == 30
    assert result.losses[0] > 5 and result.losses[-1] < 0.05
    final = out / "final"
    assert {"config.json", "qwen.tiktoken", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in final.iterdir()
    }
    rows = read_loss_csv(out / "loss.csv")
    assert [r.step for r in rows] == list(range(1, 31))
    assert [r.loss for r in rows] == pytest.approx(result.losses, rel=1e-6)
    assert Image.open(out / "loss.png").size == (800, 480)
    report = json.loads((out / "data_report.json").read_text())
    assert report["counts"]["kept"] == 2
    model = qwen_vl.QWenLMHeadModel.from_pretrained(final, dtype=torch.float32)
    for name, (_, _, answer) in SCENES.items():
        assert ask(model, tokenizer, data.parent, name) == answer


@pytest.mark.slow
def test_lora_base_mode_learns_then_merge_gives_the_same_answers(checkpoint_dir, tokenizer, tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    s = settings(
        checkpoint_dir, data, out, lora=True, train_embeddings=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
        batch_size=2, max_steps=30, learning_rate=5e-3, lr_scheduler="constant", gradient_checkpointing=True,
    )  # fmt: skip
    result = train(s, quiet=True)
    assert result.mode == "lora" and result.losses[-1] < 0.05
    adapter = out / "final"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(checkpoint_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0
    model = qwen_vl.QWenLMHeadModel.from_pretrained(merged, dtype=torch.float32)
    for name, (_, _, answer) in SCENES.items():
        assert ask(model, tokenizer, data.parent, name) == answer


def test_only_labelled_positions_reach_lm_head(fp32_model):
    """The training loss (lm_head on labelled positions only) equals the loss over full logits."""
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100
    labels[1, 10:] = -100
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    out = fp32_model(ids, attention_mask=mask, labels=labels)
    full = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1)
    )
    assert out.loss.item() == pytest.approx(full.item(), rel=1e-5)
    summed = fp32_model(ids, attention_mask=mask, labels=labels, loss_reduction="sum", compute_logits=False)
    assert summed.logits is None
    assert summed.loss.item() == pytest.approx(full.item() * int((labels[:, 1:] != -100).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="compute_logits=False is for training"):
        fp32_model(ids, compute_logits=False)


def test_settings_name_the_bad_option(checkpoint_dir, tmp_path):
    with pytest.raises(ValueError, match="--batch-size must be at least 1, got 0"):
        settings(checkpoint_dir, tmp_path / "d.json", tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="--lr-scheduler must be one of cosine, linear, constant"):
        settings(checkpoint_dir, tmp_path / "d.json", tmp_path, lr_scheduler="step")
    with pytest.raises(ValueError, match="--warmup-ratio must be within"):
        settings(checkpoint_dir, tmp_path / "d.json", tmp_path, warmup_ratio=2.0)
    with pytest.raises(ValueError, match="--dataloader-workers must not be negative, got -1"):
        settings(checkpoint_dir, tmp_path / "d.json", tmp_path, dataloader_workers=-1)
    assert settings(checkpoint_dir, tmp_path / "d.json", tmp_path, q_lora=True).mode() == "q-lora"


def test_dataloader_workers_read_the_same_batches(checkpoint_dir, tmp_path):
    data = make_data(tmp_path / "data", copies=2)
    kw = dict(batch_size=2, max_steps=3, learning_rate=1e-3, fix_vit=True)
    inline = train(settings(checkpoint_dir, data, tmp_path / "inline", **kw), quiet=True)
    ahead = train(settings(checkpoint_dir, data, tmp_path / "ahead", dataloader_workers=2, **kw), quiet=True)
    assert ahead.losses == inline.losses and len(inline.losses) == 3


@pytest.mark.slow
def test_float16_lora_scales_the_loss_learns_and_resumes_exactly(checkpoint_dir, tmp_path):
    data = make_data(tmp_path / "data")
    kw = dict(
        lora=True, train_embeddings=True, lora_r=8, lora_dropout=0.1, batch_size=2, max_steps=8,
        learning_rate=5e-3, lr_scheduler="constant", dtype="float16", save_steps=4,
    )  # fmt: skip
    whole = tmp_path / "whole"
    result = train(settings(checkpoint_dir, data, whole, **kw), quiet=True)
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0] / 2
    assert (whole / "checkpoint-4" / "scaler.pt").is_file()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-4", resumed / "checkpoint-4")
    rows = (whole / "loss.csv").read_text().splitlines()[:5]  # header + steps 1-4
    (resumed / "loss.csv").write_text("\n".join(rows) + "\n")
    again = train(settings(checkpoint_dir, data, resumed, resume=True, **kw), quiet=True)
    assert again.resumed_from == resumed / "checkpoint-4"
    assert [r.loss for r in read_loss_csv(resumed / "loss.csv")] == [r.loss for r in read_loss_csv(whole / "loss.csv")]


def test_half_precision_trains_float32_weights_under_autocast(checkpoint_dir, tmp_path):
    full = prepare_model(settings(checkpoint_dir, tmp_path / "d.json", tmp_path, dtype="bfloat16"), torch.device("cpu"))
    assert full.autocast == torch.bfloat16
    assert {p.dtype for p in full.core.parameters()} == {torch.float32}  # float32 master weights
    lora = prepare_model(
        settings(checkpoint_dir, tmp_path / "d.json", tmp_path, dtype="float16", lora=True), torch.device("cpu")
    )
    assert lora.autocast == torch.float16
    assert {p.dtype for p in lora.core.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in lora.core.parameters() if not p.requires_grad} == {torch.float16}
    with pytest.raises(ValueError, match="--dtype float16 .* works without --fsdp / --deepspeed"):
        prepare_model(
            settings(checkpoint_dir, tmp_path / "d.json", tmp_path, dtype="float16", fsdp=True), torch.device("cpu")
        )


def test_fix_resampler_freezes_the_whole_tower(checkpoint_dir, tmp_path):
    from qwen_vl.cli import build_parser
    from qwen_vl.cli.finetune import settings_from_args

    data = make_data(tmp_path / "data")
    argv = ["finetune", "--model", str(checkpoint_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")]
    assert settings_from_args(build_parser().parse_args(argv)).train_resampler is True
    s = settings_from_args(build_parser().parse_args(argv + ["--fix-resampler"]))
    assert s.train_resampler is False and s.fix_vit is True
    tm = prepare_model(s, torch.device("cpu"))
    assert tm.summary.by_part["vision"][0] == 0 and tm.summary.by_part["resampler"][0] == 0
    assert tm.summary.by_part["llm"][0] > 0
    lora = prepare_model(
        settings(checkpoint_dir, data, tmp_path, lora=True, train_resampler=False), torch.device("cpu")
    )
    assert lora.summary.by_part["resampler"][0] == 0


def test_q_lora_on_cpu_is_one_clear_line(checkpoint_dir, tmp_path, capsys):
    data = make_data(tmp_path / "data")
    args = ["finetune", "--model", str(checkpoint_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")]
    assert main(args + ["--q-lora", "--device", "cpu", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen-vl: error: --q-lora needs a CUDA GPU and the bitsandbytes package")


def test_bad_data_is_reported_before_the_model_loads(checkpoint_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "conversations": [{"from": "user", "value": ""}]}\n', encoding="utf-8")
    args = ["finetune", "--model", str(checkpoint_dir), "--data", str(bad), "--output-dir", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "record 'x'" in err and "conversations[0].value" in err


def test_out_of_memory_names_the_options_that_lower_it(checkpoint_dir, tmp_path, monkeypatch):
    data = make_data(tmp_path / "data")

    def no_memory(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer_module._Run, "_step", no_memory)
    with pytest.raises(TrainingOutOfMemory) as info:
        train(settings(checkpoint_dir, data, tmp_path / "out", max_steps=1, batch_size=2), quiet=True)
    message = str(info.value)
    for option in ("--batch-size", "--gradient-checkpointing", "--model-max-length", "--lora"):
        assert option in message


# ----- processes ------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def finetune_args(checkpoint_dir, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(checkpoint_dir), "--data", str(data), "--output-dir", str(out), "--seed", "3",
        "--warmup-ratio", "0.2", "--learning-rate", "1e-3", "--quiet", *extra,
    ]  # fmt: skip


def run_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwen_vl.cli", *args]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_killed_run_resumes_exactly(checkpoint_dir, tmp_path):
    """SIGKILL after a checkpoint, --resume: the loss curve equals an uninterrupted run's, bit for bit."""
    data = make_data(tmp_path / "data", copies=3)  # 6 records, batch 2, accumulation 2 -> 2 steps per epoch
    extra = ["--lora", "--lora-r", "4", "--lora-dropout", "0.1", "--batch-size", "2", "--gradient-accumulation-steps",
             "2", "--epochs", "4", "--save-steps", "2", "--save-total-limit", "2"]  # fmt: skip
    whole = tmp_path / "whole"
    run_cli(finetune_args(checkpoint_dir, data, whole, *extra))
    expected = read_loss_csv(whole / "loss.csv")
    assert len(expected) == 8

    broken = tmp_path / "broken"
    cmd = [sys.executable, "-m", "qwen_vl.cli", *finetune_args(checkpoint_dir, data, broken, *extra)]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (broken / "checkpoint-4").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "final").exists()
    killed_at = max(r.step for r in read_loss_csv(broken / "loss.csv"))
    assert 4 <= killed_at < 8

    run_cli([*finetune_args(checkpoint_dir, data, broken, *extra), "--resume"])
    resumed = read_loss_csv(broken / "loss.csv")
    assert [(r.step, r.loss, r.lr, r.tokens) for r in resumed] == [(r.step, r.loss, r.lr, r.tokens) for r in expected]
    a = load_file(whole / "final" / "adapter_model.safetensors")
    b = load_file(broken / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_reach_the_weights_of_one(checkpoint_dir, tmp_path):
    data = make_data(tmp_path / "data", copies=2)  # 4 records
    common = ["--max-steps", "3", "--gradient-accumulation-steps", "1", "--device", "cpu"]
    one = tmp_path / "one"
    run_cli(finetune_args(checkpoint_dir, data, one, "--batch-size", "4", *common))
    two = tmp_path / "two"
    launcher = [
        "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "qwen_vl.cli",
    ]  # fmt: skip
    cmd = [sys.executable, *launcher, *finetune_args(checkpoint_dir, data, two, "--batch-size", "2", *common)]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses_one = [r.loss for r in read_loss_csv(one / "loss.csv")]
    losses_two = [r.loss for r in read_loss_csv(two / "loss.csv")]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    changed = [k for k in a if not torch.equal(a[k], load_file_base(checkpoint_dir).get(k, a[k]))]
    assert changed  # training moved the weights


_BASE: dict[str, dict[str, torch.Tensor]] = {}


def load_file_base(checkpoint_dir) -> dict[str, torch.Tensor]:
    key = str(checkpoint_dir)
    if key not in _BASE:
        model = qwen_vl.QWenLMHeadModel.from_pretrained(checkpoint_dir, dtype=torch.float32)
        _BASE[key] = {k: v.clone() for k, v in model.state_dict().items()}
    return _BASE[key]
