"""Checkpoint formats, dtypes, tying, and loud errors for mismatched files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import max_abs

import qwen_vl
from qwen_vl.model.loading import CheckpointError, iter_tensors, weight_files
from qwen_vl.model.saving import save_checkpoint

TEXT_IDS = [9707, 1879, 11, 1246, 525, 498, 30]


def copy_configs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken"):
        shutil.copy(src / name, dst / name)


def golden_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return {n: t.clone() for p in weight_files(checkpoint_dir) for n, t in iter_tensors(p)}


def write_safetensors(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    from safetensors.torch import save_file

    names = sorted(state)
    if shards == 1:
        save_file(state, str(out / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(out / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def logits(model: qwen_vl.QWenLMHeadModel) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([TEXT_IDS])).logits[0].float()


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_loads_like_bin(shards, tmp_path, checkpoint_dir, fp32_model):
    copy_configs(checkpoint_dir, tmp_path)
    write_safetensors(golden_state(checkpoint_dir), tmp_path, shards)
    model = qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert torch.equal(logits(model), logits(fp32_model))


def test_single_bin_file(tmp_path, checkpoint_dir, fp32_model):
    copy_configs(checkpoint_dir, tmp_path)
    torch.save(golden_state(checkpoint_dir), tmp_path / "pytorch_model.bin")
    model = qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path, dtype="float32")
    assert torch.equal(logits(model), logits(fp32_model))


@pytest.mark.parametrize(
    "requested, expected",
    [("auto", torch.bfloat16), ("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32)],
)
def test_compute_dtype(requested, expected, checkpoint_dir):
    model = qwen_vl.QWenLMHeadModel.from_pretrained(checkpoint_dir, torch_dtype=requested)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert next(model.parameters()).device.type == "cpu"


def test_unknown_dtype_is_rejected(checkpoint_dir):
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        qwen_vl.QWenLMHeadModel.from_pretrained(checkpoint_dir, torch_dtype="int3")


def test_tied_embeddings_without_lm_head(tmp_path, checkpoint_dir):
    copy_configs(checkpoint_dir, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = golden_state(checkpoint_dir)
    del state["lm_head.weight"]
    write_safetensors(state, tmp_path, 1)
    model = qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert model.lm_head.weight is model.transformer.wte.weight
    out = logits(model)
    with torch.no_grad():
        h = model.transformer(torch.tensor([TEXT_IDS]))[0][0]
    assert max_abs(out, h @ state["transformer.wte.weight"].float().T) <= 1e-4


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path, checkpoint_dir):
    copy_configs(checkpoint_dir, tmp_path)
    state = golden_state(checkpoint_dir)
    del state["transformer.h.1.mlp.w1.weight"]
    del state["transformer.visual.proj"]
    state["transformer.h.0.attn.rotary.inv_freq"] = torch.zeros(4)
    state["transformer.ln_f.weight"] = torch.ones(7)
    write_safetensors(state, tmp_path, 1)
    with pytest.raises(CheckpointError) as err:
        qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing keys (2): transformer.h.1.mlp.w1.weight, transformer.visual.proj" in message
    assert "unexpected keys (1): transformer.h.0.attn.rotary.inv_freq (model.safetensors)" in message
    assert "transformer.ln_f.weight: checkpoint (7,) vs model (128,)" in message


def test_missing_shard_and_empty_directory(tmp_path, checkpoint_dir):
    copy_configs(checkpoint_dir, tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path)
    shutil.copy(checkpoint_dir / "pytorch_model.bin.index.json", tmp_path)
    with pytest.raises(CheckpointError, match="shard files missing.*pytorch_model-00001-of-00003.bin"):
        qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path / "Qwen" / "Qwen-VL-Chat")


def test_save_checkpoint_round_trip(tmp_path, fp32_model):
    files = save_checkpoint(fp32_model, tmp_path, safe_serialization=False, max_shard_bytes=20_000_000)
    assert len(files) > 1 and (tmp_path / "pytorch_model.bin.index.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    reloaded = qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert torch.equal(logits(reloaded), logits(fp32_model))


def test_bf16_load_agrees_with_fp32(checkpoint_dir, fp32_model, golden_dir):
    """bf16 compute keeps ~3 significant digits; logits (|x| <= 5.2) stay within 0.1."""
    bf16 = qwen_vl.QWenLMHeadModel.from_pretrained(checkpoint_dir, torch_dtype=torch.bfloat16)
    from model_fixtures import case_by_id, working_directory

    for case_id in ("text_en", "img1_shapes"):
        ids = torch.tensor([case_by_id(case_id)["input_ids"]])
        with working_directory(golden_dir), torch.no_grad():
            a = fp32_model(ids).logits[0, -1]
            b = bf16(ids).logits[0, -1].float()
        assert max_abs(a, b) <= 0.1


LOAD_RSS_SCRIPT = """
import resource, sys, torch, qwen_vl
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = qwen_vl.QWenLMHeadModel.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = sum(p.numel() * p.element_size() for p in model.parameters())
print((after - before) * 1024, params)
"""


def test_loading_does_not_hold_two_copies(checkpoint_dir):
    out = subprocess.run(
        [sys.executable, "-c", LOAD_RSS_SCRIPT, str(checkpoint_dir)], capture_output=True, text=True, check=True
    )
    peak_rise, model_bytes = map(int, out.stdout.split()[-2:])
    # Two full float32 copies would need 2x; one copy plus one memory-mapped shard stays well below.
    assert peak_rise < 1.5 * model_bytes, (peak_rise, model_bytes)
