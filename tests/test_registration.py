"""register() makes the Auto classes return qwen_vl's classes without trust_remote_code."""

from __future__ import annotations

import json

import transformers
from transformers import AutoConfig, AutoTokenizer

from qwen_vl.config import QWenConfig
from qwen_vl.registration import REGISTRATIONS, register
from qwen_vl.tokenizer import QWenTokenizer


def test_official_folder_names_remote_code(checkpoint_dir):
    assert "auto_map" in json.loads((checkpoint_dir / "config.json").read_text())
    assert "auto_map" in json.loads((checkpoint_dir / "tokenizer_config.json").read_text())


def test_auto_classes_return_ours(checkpoint_dir):
    register()
    register()  # idempotent
    config = AutoConfig.from_pretrained(checkpoint_dir)
    assert type(config) is QWenConfig
    assert config.hidden_size == 128
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    assert type(tokenizer) is QWenTokenizer
    assert tokenizer.encode("Hello world") == [9707, 1879]


def test_auto_tokenizer_loads_a_saved_folder(checkpoint_dir, tmp_path):
    register()
    QWenTokenizer.from_pretrained(checkpoint_dir).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((checkpoint_dir / "config.json").read_text())
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is QWenTokenizer


def test_registration_list_and_transformers_version():
    assert len(REGISTRATIONS) >= 2
    assert int(transformers.__version__.split(".")[0]) >= 5


def test_auto_model_returns_ours(checkpoint_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_vl.modeling import QWenLMHeadModel

    register()
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    assert type(model) is QWenLMHeadModel
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert model(torch.tensor([[9707, 1879]])).logits.shape == (1, 2, 151936)
