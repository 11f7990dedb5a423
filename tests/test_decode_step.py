"""The engine's tensor-only decode step against the model's general forward.

Uses the second config of test_generality (seq_length 24, so dynamic NTK and
log-n fire) with rows of different lengths, a left-padded prefill and rows whose
NTK factors differ.
"""

from __future__ import annotations

import logging

import pytest
import torch
from model_fixtures import case_by_id, model_cases, working_directory
from test_generality import random_model

from qwen_vl.engine import decode_step as decode_step_module
from qwen_vl.engine.decode_step import DecodeStep
from qwen_vl.engine.engine import Engine
from qwen_vl.engine.kv_cache import KVCache
from qwen_vl.engine.request import GenerationRequest

GENERATE_CASES = [c["id"] for c in model_cases()["cases"] if "generate" in c]


@pytest.fixture(scope="module")
def model():
    return random_model()


def new_cache(model, rows: int = 4, slots: int = 96) -> KVCache:
    cfg = model.config
    return KVCache(cfg.num_hidden_layers, rows, cfg.num_attention_heads, cfg.head_dim, slots, torch.float32, "cpu")


def prefill(model, cache: KVCache) -> list[int]:
    """Rows 0-1: one padded batch (lengths 5 and 9); rows 2-3 alone (30 tokens: NTK
    factor > 1; 3 tokens). Returns each row's last token."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 2000, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    model(ids, attention_mask=mask, kv_cache=cache.rows(0, 2), logits_to_keep=1)
    long = torch.randint(100, 2000, (1, 30), generator=g)
    short = torch.randint(100, 2000, (1, 3), generator=g)
    model(long, kv_cache=cache.rows(2, 3), logits_to_keep=1)
    model(short, kv_cache=cache.rows(3, 4), logits_to_keep=1)
    return [int(ids[0, -1]), int(ids[1, -1]), int(long[0, -1]), int(short[0, -1])]


@torch.no_grad()
@pytest.mark.parametrize("padded_shapes", [False, True], ids=["exact", "cuda-graph-buckets"])
def test_decode_step_equals_general_forward(model, padded_shapes):
    reference, fast = new_cache(model), new_cache(model)
    last = prefill(model, reference)
    assert prefill(model, fast) == last
    assert len(set(reference.ntk_alphas)) > 1  # rows with different NTK factors
    step = DecodeStep(model, fast, mode="eager", length_bucket=16)
    step.cuda_graphs = padded_shapes  # pad rows to a power of two and the span to a bucket, still eager
    g = torch.Generator().manual_seed(2)
    for i in range(40):  # past seq_length 24: log-n scaling on every row
        n = 4 if i < 30 else 3  # a row leaves: decode rows [0, 3)
        expected = model(torch.tensor(last[:n])[:, None], kv_cache=reference.rows(0, n), logits_to_keep=1).logits[:, -1]
        got = step(last[:n])
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5, i
        last = torch.randint(100, 2000, (4,), generator=g).tolist()
    assert fast.lengths == reference.lengths
    assert torch.equal(fast.next_position, reference.next_position)
    for row, n in enumerate(fast.lengths):
        assert torch.equal(fast.valid[row, :n], reference.valid[row, :n])
        assert torch.allclose(fast.keys[:, row, :, :n], reference.keys[:, row, :, :n], atol=1e-4)


def test_full_cache_is_refused(model):
    cache = new_cache(model, rows=1, slots=8)
    model(torch.arange(100, 108)[None], kv_cache=cache.rows(0, 1), logits_to_keep=1)
    with pytest.raises(ValueError, match="KV cache full"):
        DecodeStep(model, cache, mode="eager")([5])


def test_unknown_mode_is_refused(model):
    with pytest.raises(ValueError, match="decode mode must be one of auto, eager, compile"):
        DecodeStep(model, new_cache(model), mode="fast")


def test_auto_is_eager_on_cpu(model):
    step = DecodeStep(model, new_cache(model))
    assert step.mode == "eager" and not step.compiled


def test_failing_compiled_step_falls_back_to_eager(model, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(decode_step_module, "compiled_decode_forward", lambda cuda_graphs: broken)
    reference, fast = new_cache(model), new_cache(model)
    last = prefill(model, reference)
    prefill(model, fast)
    step = DecodeStep(model, fast, mode="compile")
    assert step.compiled
    with caplog.at_level(logging.WARNING):
        got = step(last)
    assert not step.compiled
    assert "no compiler here" in caplog.text
    expected = model(torch.tensor(last)[:, None], kv_cache=reference.rows(0, 4), logits_to_keep=1).logits[:, -1]
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_compiled_engine_equals_goldens(fp32_model, tokenizer, golden_dir):
    """torch.compile (inductor, dynamic shapes) on CPU: the golden greedy tokens, batched."""
    fp32_model.image_cache = None
    with working_directory(golden_dir):
        engine = Engine(fp32_model, tokenizer, max_batch_size=4, max_seq_len=1024, decode_mode="compile")
        requests = [GenerationRequest(prompt_ids=case_by_id(c)["input_ids"], max_new_tokens=16) for c in GENERATE_CASES]
        handles = engine.generate(requests)
    assert engine.decode_step.compiled
    for case_id, h in zip(GENERATE_CASES, handles):
        assert h.token_ids == case_by_id(case_id)["generate"]["new_ids"], case_id
    fp32_model.image_cache = None


def test_length_buckets_are_few_and_tight():
    from qwen_vl.engine.decode_step import bucket_length

    buckets = {bucket_length(n) for n in range(1, 8193)}
    assert len(buckets) == 16
    assert all(n <= bucket_length(n) for n in range(1, 8193))
    assert all(bucket_length(n) - n < max(256, n // 4) for n in range(1, 8193))
    assert bucket_length(1) == 256 and bucket_length(257) == 512 and bucket_length(8000) == 8192
