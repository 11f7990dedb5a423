"""``init_checkpoint`` / ``qwen-vl init``: random weights in the official layout, reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import qwen_vl
from qwen_vl.finetune.scratch import init_checkpoint


def test_seeded_checkpoint_loads_and_repeats(checkpoint_dir, tmp_path):
    a = init_checkpoint(checkpoint_dir, tmp_path / "a", seed=3)
    b = init_checkpoint(checkpoint_dir, tmp_path / "b", seed=3)
    c = init_checkpoint(checkpoint_dir, tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(str(files[0])) for files in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["transformer.wte.weight"], wc["transformer.wte.weight"])
    for name in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (tmp_path / "a" / name).is_file()
    model = qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert torch.equal(model.transformer.wte.weight, wa["transformer.wte.weight"])
    std = float(model.transformer.h[0].attn.c_attn.weight.detach().std())
    assert abs(std - model.config.initializer_range) < 0.005


def test_other_config_and_tied_embeddings(checkpoint_dir, tmp_path):
    config = json.loads((checkpoint_dir / "config.json").read_text())
    config.update(num_hidden_layers=1, tie_word_embeddings=True)
    path = tmp_path / "small.json"
    path.write_text(json.dumps(config))
    (weights,) = init_checkpoint(checkpoint_dir, tmp_path / "out", config=path, dtype="bfloat16")
    stored = load_file(str(weights))
    assert "lm_head.weight" not in stored and stored["transformer.wte.weight"].dtype == torch.bfloat16
    model = qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert len(model.transformer.h) == 1


def test_errors_name_the_problem(checkpoint_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        init_checkpoint(checkpoint_dir, tmp_path / "x", config=tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        init_checkpoint(tmp_path, tmp_path / "x", config=checkpoint_dir / "config.json")
    bad = json.loads((checkpoint_dir / "config.json").read_text())
    bad["hidden_size"] = 130
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="hidden_size"):
        init_checkpoint(checkpoint_dir, tmp_path / "x", config=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="dtype"):
        init_checkpoint(checkpoint_dir, tmp_path / "x", dtype="int8")


def test_cli_writes_and_refuses_to_overwrite(checkpoint_dir, tmp_path, capsys):
    from qwen_vl.cli import main

    out = tmp_path / "new"
    assert main(["init", "--like", str(checkpoint_dir), "--out", str(out), "--seed", "1"]) == 0
    assert "wrote 1 weight file(s)" in capsys.readouterr().out
    assert main(["init", "--like", str(checkpoint_dir), "--out", str(out)]) == 2
    assert "qwen-vl: error:" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()


def test_a_directory_without_weights_is_enough(checkpoint_dir, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        (base / name).write_bytes((checkpoint_dir / name).read_bytes())
    (weights,) = init_checkpoint(base, tmp_path / "out")
    assert weights.name == "model.safetensors" and (tmp_path / "out" / "qwen.tiktoken").is_file()


def test_local_resampler_maps_each_patch_to_its_own_query():
    from qwen_vl.finetune.scratch import localise_resampler
    from qwen_vl.model.vision import Resampler

    torch.manual_seed(0)
    x = torch.randn(1, 256, 192)  # ViT features of a 16 x 16 patch grid
    bumped = x.clone()
    bumped[0, 37] += 3.0

    def spread(resampler: Resampler) -> tuple[int, float]:
        with torch.no_grad():
            change = (resampler(bumped) - resampler(x)).norm(dim=-1)[0]  # (256,)
        return int(change.argmax()), float(change[37] / change.sum())

    resampler = Resampler(16, 128, 1, kv_dim=192)
    resampler.init_weights()
    top, share = spread(resampler)
    assert share < 0.05  # random: the bump reaches every query alike
    localise_resampler(resampler)
    top, share = spread(resampler)
    assert top == 37 and share > 0.3  # local: mostly its own query (neighbours share the rest)


def test_init_resampler_choice(checkpoint_dir, tmp_path):
    local = load_file(str(init_checkpoint(checkpoint_dir, tmp_path / "l", seed=1)[0]))
    plain = load_file(str(init_checkpoint(checkpoint_dir, tmp_path / "r", seed=1, resampler="random")[0]))
    assert float(local["transformer.visual.attn_pool.query"].abs().max()) == 0.0
    assert float(plain["transformer.visual.attn_pool.query"].abs().max()) > 0.0
    assert torch.equal(local["transformer.wte.weight"], plain["transformer.wte.weight"])
    with pytest.raises(ValueError, match="resampler must be one of"):
        init_checkpoint(checkpoint_dir, tmp_path / "x", resampler="grid")
