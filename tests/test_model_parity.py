"""Parity of the float32 model with the reference goldens (../shared/golden).

Tolerances are the golden README's: logits within 1e-4 absolute, hidden states
within 1e-5 relative, token ids and strings exactly equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import case_by_id, golden_array, max_abs, model_cases, working_directory

import qwen_vl
from qwen_vl.model.rotary import ntk_alpha_for_length

LOGITS_ATOL = 1e-4
HIDDEN_RTOL = 1e-5

CASES = [c["id"] for c in model_cases()["cases"]]
GENERATE_CASES = [c["id"] for c in model_cases()["cases"] if "generate" in c]
CHAT_CASES = [c["id"] for c in model_cases()["cases"] if c["kind"] == "chat"]


@pytest.fixture(scope="module")
def forward_results(fp32_model, golden_dir):
    """One forward (all positions, hidden states) per case, computed once."""
    results = {}
    with working_directory(golden_dir), torch.no_grad():
        for case_id in CASES:
            ids = torch.tensor([case_by_id(case_id)["input_ids"]])
            results[case_id] = fp32_model(ids, output_hidden_states=True)
    return results


@pytest.mark.parametrize("case_id", CASES)
def test_input_ids_match_the_prompt(case_id, tokenizer):
    case = case_by_id(case_id)
    if case["kind"] == "list_format":
        assert tokenizer.from_list_format(case["list"]) == case["prompt"]
        ids = tokenizer(case["prompt"], return_tensors="pt")["input_ids"][0].tolist()
    else:
        raw_text, ids = qwen_vl.make_context(
            tokenizer, case["query"], history=case["history"], system=case["system"], max_window_size=6144
        )
        assert raw_text == case["raw_text"]
    assert ids == case["input_ids"]
    assert len(ids) == case["seq_len"]


@pytest.mark.parametrize("case_id", CASES)
def test_ntk_alpha_and_logn_positions(case_id, fp32_model):
    case = case_by_id(case_id)
    cfg = fp32_model.config
    assert ntk_alpha_for_length(case["seq_len"], cfg.seq_length) == case["prefill_ntk_alpha"]
    assert max(0, case["seq_len"] - cfg.seq_length) == case["logn_scaled_positions"]


@pytest.mark.parametrize("case_id", CASES)
def test_last_position_logits(case_id, forward_results):
    case = case_by_id(case_id)
    ours = forward_results[case_id].logits[0, -1]
    golden = golden_array(case["last_logits"]["file"])
    assert max_abs(ours, golden) <= LOGITS_ATOL
    top_ids = case["last_logits"]["top20_ids"]
    assert max_abs(ours[top_ids], case["last_logits"]["top20_values"]) <= LOGITS_ATOL


@pytest.mark.parametrize("case_id", CASES)
def test_per_position_summaries(case_id, forward_results):
    case = case_by_id(case_id)
    logits = forward_results[case_id].logits[0].double()  # (T, V)
    pp = case["per_position"]
    assert max_abs(logits.max(-1).values, pp["max"]) <= LOGITS_ATOL
    assert max_abs(torch.logsumexp(logits, -1), pp["logsumexp"]) <= LOGITS_ATOL
    golden_argmax = torch.tensor(pp["argmax"])
    ours_argmax = logits.argmax(-1)
    differ = (ours_argmax != golden_argmax).nonzero().flatten().tolist()
    for p in differ:  # only a near tie may flip: the golden winner must be within tolerance of the max
        assert float(logits[p].max() - logits[p, golden_argmax[p]]) <= LOGITS_ATOL


@pytest.mark.parametrize("case_id", CASES)
def test_hidden_states(case_id, forward_results, fp32_model):
    case = case_by_id(case_id)
    ours = forward_results[case_id].hidden_states
    golden = case["hidden_states"]
    assert len(ours) == len(golden) == fp32_model.config.num_hidden_layers + 1
    for h, g in zip(ours, golden):
        h = h[0].double()
        assert abs(float(h.mean()) - g["mean"]) <= HIDDEN_RTOL * max(1.0, abs(g["std"]))
        assert abs(float(h.std()) - g["std"]) <= HIDDEN_RTOL * max(1.0, abs(g["std"]))
        first16 = np.asarray(g["last_position_first16"])
        assert max_abs(h[-1, :16], first16) <= HIDDEN_RTOL * max(1.0, float(np.abs(first16).max()))


def test_all_positions_logits_file(forward_results):
    golden = golden_array("logits/text_en_all.npy")
    ours = forward_results["text_en"].logits[0]
    assert ours.shape == golden.shape
    assert max_abs(ours, golden) <= LOGITS_ATOL


@pytest.mark.parametrize("case_id", GENERATE_CASES)
def test_greedy_generation(case_id, fp32_model, tokenizer, golden_dir):
    case = case_by_id(case_id)
    ids = torch.tensor([case["input_ids"]])
    with working_directory(golden_dir):
        out = fp32_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    new_ids = out[0, ids.shape[1] :].tolist()
    assert new_ids == case["generate"]["new_ids"]
    assert tokenizer.decode(new_ids) == case["generate"]["decoded"]["text"]
    assert tokenizer.decode(new_ids, skip_special_tokens=True) == case["generate"]["decoded_skip_special"]["text"]


@pytest.mark.parametrize("case_id", CHAT_CASES)
def test_chat(case_id, fp32_model, tokenizer, golden_dir):
    case = case_by_id(case_id)
    call = case["chat_call"]
    history = [tuple(turn) for turn in case["history"]] if case["history"] else None
    with working_directory(golden_dir):
        response, history_out = fp32_model.chat(
            tokenizer,
            case["query"],
            history=history,
            system=call["system"],
            stop_words_ids=call["stop_words_ids_arg"],
            **call["generation_config_overrides"],
        )
    assert response == case["chat"]["response"]
    assert [list(t) for t in history_out] == case["chat"]["history_out"]
    if history is not None:
        assert len(history) == len(case["history"])  # the caller's list is not modified


@pytest.mark.parametrize("case_id", CHAT_CASES)
def test_chat_generated_ids(case_id, fp32_model, golden_dir):
    case = case_by_id(case_id)
    call = case["chat_call"]
    ids = torch.tensor([case["input_ids"]])
    with working_directory(golden_dir):
        out = fp32_model.generate(
            ids, stop_words_ids=case["chat"]["stop_words_ids_used"], **call["generation_config_overrides"]
        )
    assert out[0, ids.shape[1] :].tolist() == case["chat"]["generated_ids"]


def test_chat_stream_matches_chat(fp32_model, tokenizer, golden_dir):
    case = case_by_id("chat_img1")
    call = case["chat_call"]
    kwargs = dict(
        system=call["system"], stop_words_ids=call["stop_words_ids_arg"], **call["generation_config_overrides"]
    )
    with working_directory(golden_dir):
        chunks = list(fp32_model.chat_stream(tokenizer, case["query"], history=None, **kwargs))
        deltas = list(fp32_model.chat_stream(tokenizer, case["query"], history=None, delta=True, **kwargs))
        full, _ = fp32_model.chat(tokenizer, case["query"], history=None, keep_last_token=True, **kwargs)
    assert chunks and all(b.startswith(a) for a, b in zip(chunks, chunks[1:]))
    assert "".join(deltas) == chunks[-1]
    assert chunks[-1].strip() == full
    assert "\ufffd" not in "".join(deltas)
