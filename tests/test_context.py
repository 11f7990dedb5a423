"""Conversations longer than the budget: whole turns dropped or a clear error."""

from __future__ import annotations

import pytest
import torch

from qwen_vl.context import ContextTooLongError, fit_context
from qwen_vl.model.image_spans import find_image_spans

IMG = "Picture 1: <img>images/shapes_rgb_448x448.png</img>\n"


def history() -> list[tuple[str, str]]:
    return [(IMG + "what is this?", "<ref>a square</ref><box>(10,20),(300,400)</box>")] + [
        (f"question {i} " * 20, f"answer {i} " * 20) for i in range(4)
    ]


def test_fits_unchanged_when_under_budget(tokenizer):
    raw, ids, kept = fit_context(tokenizer, "hi", history(), "sys", 6144, budget=10_000)
    assert kept == history()
    assert len(ids) <= 10_000


def test_drops_whole_oldest_turns(tokenizer):
    _, full, _ = fit_context(tokenizer, "hi", history(), "sys", 6144, budget=10_000)
    budget = len(full) - 10  # the image turn (over 258 ids) must go, nothing else
    raw, ids, kept = fit_context(tokenizer, "hi", history(), "sys", 6144, budget=budget)
    assert len(ids) <= budget
    assert kept == history()[1:]
    assert "<img>" not in raw and "<box>" not in raw
    find_image_spans(torch.tensor([ids]), tokenizer.img_start_id)  # never a cut span


def test_error_mode_names_the_sizes(tokenizer):
    with pytest.raises(ContextTooLongError, match=r"takes \d+ tokens, over the budget of 300 \(5 earlier turns\)"):
        fit_context(tokenizer, "hi", history(), "sys", 6144, budget=300, overflow="error")
    with pytest.raises(ContextTooLongError, match="query and system prompt take"):
        fit_context(tokenizer, "word " * 500, [], "sys", 6144, budget=100)
    with pytest.raises(ValueError, match="overflow must be"):
        fit_context(tokenizer, "hi", [], "sys", 6144, budget=100, overflow="truncate")


def test_chat_drops_old_turns_to_fit(fp32_model, tokenizer, golden_dir):
    from model_fixtures import working_directory

    with working_directory(golden_dir):
        response, hist = fp32_model.chat(
            tokenizer, "hi", history=history(), max_context_tokens=200, do_sample=False, max_new_tokens=2
        )
        with pytest.raises(ContextTooLongError):
            fp32_model.chat(tokenizer, "hi", history=history(), max_context_tokens=200, overflow="error")
    assert len(hist) == len(history()) + 1
