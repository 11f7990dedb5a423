"""Sharded training: DeepSpeed config resolution, and two gloo processes under --fsdp or
--deepspeed (ZeRO-2, ZeRO-3) reaching the losses and weights of one plain process, with
exact resume from their checkpoints."""

from __future__ import annotations

import builtins
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune_train import cli_env, finetune_args, free_port, make_data, run_cli

import qwen_vl
from qwen_vl.finetune import deepspeed_engine
from qwen_vl.finetune.deepspeed_config import (
    SHIPPED,
    DeepSpeedConfigError,
    config_path,
    load_config,
    resolve_config,
    zero_stage,
)
from qwen_vl.finetune.loss_log import read_loss_csv
from qwen_vl.finetune.settings import FinetuneSettings

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def run_settings(tmp_path: Path, **kw) -> FinetuneSettings:
    base = dict(model=tmp_path, data=[tmp_path / "d.json"], output_dir=tmp_path / "out")
    return FinetuneSettings(**{**base, **kw})


def resolve(config: dict, tmp_path: Path, dtype=torch.float32, world_size: int = 2, **kw) -> dict:
    s = run_settings(tmp_path, batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5, **kw)
    return resolve_config(config, s, world_size=world_size, dtype=dtype, hidden_size=128, source="ds.json")


# ----- config resolution ------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_resolve_every_auto(name, tmp_path):
    raw, path = load_config(name)
    assert path == config_path(name) and path.is_file()
    out = resolve(raw, tmp_path, dtype=torch.bfloat16, weight_decay=0.05)
    assert "auto" not in json.dumps(out)
    assert out["train_micro_batch_size_per_gpu"] == 2 and out["gradient_accumulation_steps"] == 3
    assert out["train_batch_size"] == 2 * 3 * 2 and out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is True
    assert out["zero_optimization"]["reduce_bucket_size"] == 128 * 128
    assert zero_stage(out) == (2 if name == "zero2" else 3)
    if "optimizer" in out:
        assert out["optimizer"]["params"]["weight_decay"] == 0.05
        assert out["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert raw["train_batch_size"] == "auto"  # the loaded config is not modified


def test_config_numbers_that_contradict_the_run_name_the_key(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=r"ds.json: train_micro_batch_size_per_gpu is 4 but .* give 2"):
        resolve({"train_micro_batch_size_per_gpu": 4}, tmp_path)
    with pytest.raises(DeepSpeedConfigError, match=r"ds.json: bf16.enabled is True but .* give False"):
        resolve({"bf16": {"enabled": True}}, tmp_path, dtype=torch.float32)
    with pytest.raises(DeepSpeedConfigError, match=r"train_batch_size is 12 but .* give 6"):
        resolve({"train_batch_size": 12}, tmp_path, world_size=1)
    out = resolve({"train_batch_size": 12, "gradient_clipping": 0.5}, tmp_path)  # agreeing numbers are fine
    assert out["train_batch_size"] == 12


def test_config_errors_name_file_line_and_key(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization.sub_group_size: \"auto\" is not supported"):
        resolve({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, tmp_path)
    with pytest.raises(DeepSpeedConfigError, match=r"ds.json: scheduler: remove this section"):
        resolve({"scheduler": {"type": "WarmupLR"}}, tmp_path)
    with pytest.raises(DeepSpeedConfigError, match=r"fp16.enabled: float16 is not supported"):
        resolve({"fp16": {"enabled": True}}, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n', encoding="utf-8")
    with pytest.raises(DeepSpeedConfigError, match=r"bad.json:2: not valid JSON"):
        load_config(bad)
    (tmp_path / "list.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(DeepSpeedConfigError, match=r"list.json: the config must be a JSON object, got list"):
        load_config(tmp_path / "list.json")
    with pytest.raises(DeepSpeedConfigError, match=r"--deepspeed zero4: no such file, and not one of zero2"):
        config_path("zero4")


def test_sharding_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--fsdp and --deepspeed both shard the model"):
        run_settings(tmp_path, fsdp=True, deepspeed="zero2")
    with pytest.raises(ValueError, match="--q-lora .* does not combine with --fsdp or --deepspeed"):
        run_settings(tmp_path, q_lora=True, fsdp=True)
    assert run_settings(tmp_path, deepspeed=tmp_path / "c.json").as_dict()["deepspeed"] == str(tmp_path / "c.json")


def test_missing_deepspeed_is_one_clear_line(monkeypatch):
    real_import = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name == "deepspeed":
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    with pytest.raises(deepspeed_engine.DeepSpeedUnavailableError) as info:
        deepspeed_engine.import_deepspeed(torch.device("cuda"))
    assert str(info.value).startswith("--deepspeed needs the deepspeed package: pip install --no-build-isolation")


def test_cli_reports_a_bad_deepspeed_config_before_training(checkpoint_dir, tmp_path, capsys):
    from qwen_vl.cli import main

    data = make_data(tmp_path / "data")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}), encoding="utf-8")
    args = ["finetune", "--model", str(checkpoint_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")]
    assert main([*args, "--device", "cpu", "--max-steps", "1", "--deepspeed", str(config)]) == 2
    err = capsys.readouterr().err
    assert "ds.json: train_micro_batch_size_per_gpu is 8 but the run's options give 1" in err
    assert not (tmp_path / "o" / "final").exists()


# ----- two processes ---------------------------------------------------------------

# 4 records, global batch 4: one step per epoch; constant rate so that every step moves the weights.
COMMON = ["--max-steps", "4", "--save-steps", "2", "--device", "cpu", "--lr-scheduler", "constant",
          "--warmup-ratio", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, checkpoint_dir) -> tuple[Path, Path]:
    """(data file, output dir) of one process with batch 4."""
    root = tmp_path_factory.mktemp("plain")
    data = make_data(root / "data", copies=2)
    run_cli(finetune_args(checkpoint_dir, data, root / "one", "--batch-size", "4", *COMMON))
    return data, root / "one"


def run_two(checkpoint_dir, data: Path, out: Path, *extra: str) -> None:
    launcher = [
        "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "qwen_vl.cli",
    ]  # fmt: skip
    args = finetune_args(checkpoint_dir, data, out, "--batch-size", "2", *COMMON, *extra)
    done = subprocess.run(
        [sys.executable, *launcher, *args], env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out: Path) -> list[float]:
    return [r.loss for r in read_loss_csv(out / "loss.csv")]


def assert_same_final_weights(a_dir: Path, b_dir: Path, exact: bool = False, atol: float = 1e-5) -> None:
    a, b = load_file(a_dir / "final" / "model.safetensors"), load_file(b_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    if not exact:
        # The resampler's key bias gets no gradient (a constant per query under the softmax): its gradient is
        # rounding noise, which Adam scales up to full-size steps. Compare its query and value parts only.
        key_bias = "transformer.visual.attn_pool.attn.in_proj_bias"
        q, _, v = a.pop(key_bias).chunk(3)
        a[key_bias] = torch.cat([q, v])
        q, _, v = b.pop(key_bias).chunk(3)
        b[key_bias] = torch.cat([q, v])
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], atol=atol, rtol=1e-4), key


def resume_from_step_2(checkpoint_dir, data: Path, whole: Path, resumed: Path, *extra: str) -> None:
    """Start a new output dir from ``whole``'s checkpoint-2, --resume, and expect ``whole``'s results."""
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    rows = (whole / "loss.csv").read_text(encoding="utf-8").splitlines()[:3]  # header + steps 1, 2
    (resumed / "loss.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    run_two(checkpoint_dir, data, resumed, *extra, "--resume")
    assert losses(resumed) == losses(whole)
    assert_same_final_weights(whole, resumed, exact=True)


@pytest.mark.slow
def test_fsdp_two_gloo_processes_reach_the_weights_of_one_and_resume_exactly(checkpoint_dir, plain_run, tmp_path):
    data, one = plain_run
    two = tmp_path / "fsdp"
    run_two(checkpoint_dir, data, two, "--fsdp")
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert len(losses(two)) == 4 and losses(two)[-1] < losses(two)[0]
    assert_same_final_weights(one, two)
    # the checkpoint holds full tensors: the plain run's checkpoint has the same names and shapes
    a, b = load_file(one / "checkpoint-2" / "model.safetensors"), load_file(two / "checkpoint-2" / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    resume_from_step_2(checkpoint_dir, data, two, tmp_path / "fsdp-resumed", "--fsdp")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_two_gloo_processes_match_one_and_resume_exactly(checkpoint_dir, plain_run, tmp_path, config):
    data, one = plain_run
    two = tmp_path / config
    run_two(checkpoint_dir, data, two, "--deepspeed", config)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    # ZeRO reduces gradients in buckets of another order: Adam turns the rounding of near-zero
    # gradients into isolated differences of ~1e-5 after 4 steps at lr 1e-3 (a wrong update moves ~1e-3)
    assert_same_final_weights(one, two, atol=1e-4)
    assert (two / "checkpoint-2" / "deepspeed" / "state").is_dir()
    assert not list(two.glob(".deepspeed-*"))  # staging directories are copied in, then removed
    model = qwen_vl.QWenLMHeadModel.from_pretrained(two / "final", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0
    if config == "zero3":
        resume_from_step_2(checkpoint_dir, data, two, tmp_path / "resumed", "--deepspeed", config)
