"""The continuous-batching engine against the golden generations and the model's own generate."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import case_by_id, model_cases, working_directory

from qwen_vl.engine.engine import Engine
from qwen_vl.engine.request import GenerationRequest
from qwen_vl.engine.sampling import SamplingParams
from qwen_vl.images import ImagePolicy

GENERATE_CASES = [c["id"] for c in model_cases()["cases"] if "generate" in c]
CHAT_CASES = [c["id"] for c in model_cases()["cases"] if c["kind"] == "chat"]


def greedy(case_id: str, **kw) -> GenerationRequest:
    kw.setdefault("max_new_tokens", 16)
    return GenerationRequest(prompt_ids=case_by_id(case_id)["input_ids"], request_id=case_id, **kw)


@pytest.fixture
def engine(fp32_model, tokenizer, golden_dir):
    fp32_model.image_cache = None
    with working_directory(golden_dir):
        yield Engine(fp32_model, tokenizer, max_batch_size=4, max_seq_len=1024)
    fp32_model.image_cache = None


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_goldens_batched_and_alone(batch, fp32_model, tokenizer, golden_dir):
    fp32_model.image_cache = None
    with working_directory(golden_dir):
        eng = Engine(fp32_model, tokenizer, max_batch_size=batch, max_seq_len=1024)
        handles = eng.generate(greedy(c) for c in GENERATE_CASES)
    for case_id, h in zip(GENERATE_CASES, handles):
        golden = case_by_id(case_id)["generate"]
        assert h.token_ids == golden["new_ids"], case_id
        assert h.text == golden["decoded_skip_special"]["text"]
        assert h.finish_reason == "length"
    fp32_model.image_cache = None


def test_requests_joining_mid_flight(engine):
    first = [engine.submit(greedy(c)) for c in GENERATE_CASES[:3]]
    for _ in range(5):
        engine.step()
    later = [engine.submit(greedy(c)) for c in GENERATE_CASES[3:]]
    engine.run_until_idle()
    for case_id, h in zip(GENERATE_CASES, first + later):
        assert h.token_ids == case_by_id(case_id)["generate"]["new_ids"], case_id


@pytest.mark.parametrize("case_id", CHAT_CASES)
def test_stop_words_as_in_chat(case_id, engine):
    case = case_by_id(case_id)
    stop = case["chat"]["stop_words_ids_used"]
    (h,) = engine.generate([greedy(case_id, stop_words_ids=stop)])
    assert h.token_ids == case["chat"]["generated_ids"]


def test_streamed_pieces_join_to_the_final_text(engine, tokenizer):
    engine.start()
    try:
        h = engine.submit(greedy("text_zh"))
        events = list(h.stream(timeout=60))
    finally:
        engine.stop()
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == h.text == tokenizer.decode(h.token_ids, skip_special_tokens=True)
    assert sum(len(e.token_ids) for e in events) == 16


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    sampling = SamplingParams(do_sample=True, top_p=0.9, temperature=1.3, seed=11)
    alone = engine.generate([greedy("text_en", sampling=sampling)])[0].token_ids
    mixed = engine.generate([greedy("text_zh"), greedy("text_en", sampling=sampling), greedy("ctx_text_history")])
    other = engine.generate(
        [greedy("text_en", sampling=SamplingParams(do_sample=True, top_p=0.9, temperature=1.3, seed=12))]
    )
    assert mixed[1].token_ids == alone
    assert other[0].token_ids != alone


def test_stop_strings_cut_the_text(engine):
    full = engine.generate([greedy("text_en")])[0]
    stop = full.text[5:8]
    cut = engine.generate([greedy("text_en", stop_strings=[stop])])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.token_ids) < 16


def test_cancelled_waiting_requests_leave_the_queue_at_once(fp32_model, tokenizer, golden_dir):
    """A request cancelled while every row is busy is finished on the next step, not kept
    (with its images) until a row frees up."""
    fp32_model.image_cache = None
    with working_directory(golden_dir):
        eng = Engine(fp32_model, tokenizer, max_batch_size=1, max_seq_len=1024)
        running = eng.submit(greedy("text_en"))
        waiting = [eng.submit(greedy("img1_shapes")) for _ in range(5)]
        eng.step()
        for h in waiting:
            h.cancel()
        eng.step()
        assert eng.num_waiting == 0
        assert all(h.finished and h.finish_reason == "cancelled" and h.token_ids == [] for h in waiting)
        assert not running.finished
        eng.run_until_idle()
    assert running.finish_reason == "length"


def test_cancellation_leaves_the_others_alone(engine):
    a = engine.submit(greedy("img1_shapes"))
    b = engine.submit(greedy("text_en"))
    engine.step()
    a.cancel()
    engine.run_until_idle()
    assert a.finish_reason == "cancelled" and len(a.token_ids) < 16
    assert b.token_ids == case_by_id("text_en")["generate"]["new_ids"]


def test_image_features_are_encoded_once(engine):
    engine.generate([greedy("img_same_twice")])  # the same noise image twice in one prompt
    assert (engine.image_cache.misses, engine.image_cache.hits) == (1, 1)
    engine.generate([greedy("img3_long")])  # holds that image again, and two new ones
    assert (engine.image_cache.misses, engine.image_cache.hits) == (3, 2)


def test_limits_and_bad_images_fail_only_their_request(fp32_model, tokenizer, golden_dir, tmp_path):
    fp32_model.image_cache = None
    with working_directory(golden_dir):
        eng = Engine(fp32_model, tokenizer, max_batch_size=2, max_seq_len=300)
        too_long = greedy("img2_rgba_palette")  # 536 tokens
        fits = greedy("img1_shapes", max_new_tokens=64)  # 268 tokens: room for 32 new ones
        handles = eng.generate([too_long, fits])
    assert handles[0].finish_reason == "error" and "536 tokens" in handles[0].error
    assert handles[1].finish_reason == "length" and len(handles[1].token_ids) == 32
    policy_before = fp32_model.image_policy
    fp32_model.image_policy = ImagePolicy(allowed_roots=(tmp_path,))
    try:
        with working_directory(golden_dir):
            (h,) = Engine(fp32_model, tokenizer, max_batch_size=1, max_seq_len=1024).generate([greedy("img1_shapes")])
    finally:
        fp32_model.image_policy = policy_before
        fp32_model.image_cache = None
    assert h.finish_reason == "error" and "outside" in h.error and "shapes_rgb_448x448.png" in h.error


def test_given_pixel_tensors_skip_file_access(engine, fp32_model, golden_dir):
    from PIL import Image

    from qwen_vl.images import image_transform

    size = int(fp32_model.config.visual["image_size"])
    pixels = image_transform(Image.open(golden_dir / "images" / "shapes_rgb_448x448.png"), size)
    (h,) = engine.generate([greedy("img1_shapes", images=[pixels])])
    assert h.token_ids == case_by_id("img1_shapes")["generate"]["new_ids"]
    assert isinstance(pixels, torch.Tensor)


def test_next_turn_reuses_the_previous_turns_keys(engine):
    turn1, turn2 = case_by_id("chat_img1"), case_by_id("chat_turn2_stopword")
    (h1,) = engine.generate([greedy("chat_img1", stop_words_ids=turn1["chat"]["stop_words_ids_used"])])
    assert h1.token_ids == turn1["chat"]["generated_ids"] and h1.reused_tokens == 0
    (h2,) = engine.generate([greedy("chat_turn2_stopword", stop_words_ids=turn2["chat"]["stop_words_ids_used"])])
    assert h2.reused_tokens >= len(turn1["input_ids"])  # the whole first context and answer
    assert h2.token_ids == turn2["chat"]["generated_ids"]
    assert engine.image_cache.misses == 1  # the image of turn 1 was not encoded again


def test_reuse_never_splits_an_image_span(engine, tokenizer):
    from qwen_vl.engine.prefix_store import PrefixStore
    from qwen_vl.model.image_spans import ImageSpan

    store = PrefixStore(capacity=2, min_tokens=1)
    prompt = list(range(20)) + [151857] + [0] * 256 + [151858] + [5, 6]
    span = ImageSpan(row=0, start=20, end=277)
    store._entries[0] = type("E", (), {"ids": prompt[:100], "ntk_alpha": 1.0})()
    entry, p = store.match(prompt, [span], 1.0)
    assert p == 20
    assert store.match(prompt, [span], 3.0) is None  # another NTK factor: no reuse


def test_a_failing_prefill_ends_its_requests(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "_prefill", broken)
    (h,) = engine.generate([greedy("text_en")])
    assert h.finish_reason == "error" and "device lost" in h.error
    monkeypatch.undo()
    assert engine.generate([greedy("text_en")])[0].token_ids == case_by_id("text_en")["generate"]["new_ids"]


def test_prefix_store_match_with_several_entries(engine):
    for case_id in ("text_en", "text_zh", "ctx_text_history"):
        engine.generate([greedy(case_id)])
    again = engine.generate([greedy("ctx_text_history"), greedy("text_en")])
    assert again[0].token_ids == case_by_id("ctx_text_history")["generate"]["new_ids"]
    assert again[0].reused_tokens > 0


def test_grounding_tags_stay_in_the_text_other_special_tokens_do_not(engine, tokenizer, monkeypatch):
    from qwen_vl.engine import engine as engine_module

    answer = "<ref>the red circle</ref><box>(10,20),(300,400)</box>"
    script = iter([*tokenizer.encode(answer), tokenizer.special_tokens["<|extra_0|>"], tokenizer.im_end_id])
    monkeypatch.setattr(
        engine_module, "select_next_tokens", lambda scores, *a: torch.tensor([next(script)] * scores.shape[0])
    )
    request = GenerationRequest(
        prompt_ids=tokenizer.encode("Hi"), max_new_tokens=32, eos_token_ids=[tokenizer.im_end_id]
    )
    (handle,) = engine.generate([request])
    assert handle.text == answer  # as the official chat() decodes: tags kept, <|extra_0|> and <|im_end|> not


def test_chat_and_chat_stream_keep_grounding_tags(fp32_model, tokenizer, monkeypatch):
    from qwen_vl.engine import engine as engine_module

    answer = "<ref>the red circle</ref><box>(10,20),(300,400)</box>"

    def scripted():
        script = iter([*tokenizer.encode(answer), tokenizer.im_end_id, tokenizer.eod_id])  # stop word, then eos
        return lambda scores, *a: torch.tensor([next(script)] * scores.shape[0])

    monkeypatch.setattr(engine_module, "select_next_tokens", scripted())
    response, _ = fp32_model.chat(tokenizer, "Where is the red circle?", history=None)
    monkeypatch.setattr(engine_module, "select_next_tokens", scripted())
    streamed = list(fp32_model.chat_stream(tokenizer, "Where is the red circle?", history=None))
    assert response == answer and streamed[-1] == answer
