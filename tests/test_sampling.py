"""Per-row sampling against the transformers logits processors and warpers."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen_vl.engine.sampling import (
    LogitsPipeline,
    SamplingParams,
    apply_repetition_penalty,
    make_generators,
    select_next_tokens,
)

V = 97
GRID = list(
    itertools.product(
        [0.3, 1.0, 1.7],  # temperature
        [0, 1, 5, V + 10],  # top_k
        [0.05, 0.3, 0.9, 1.0],  # top_p
    )
)


def reference_scores(scores: torch.Tensor, ids: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row (1, V) through the transformers processors in generation order."""
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores.clone())
    if not p.do_sample:
        return scores
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k != 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return scores


def pipeline_scores(scores: torch.Tensor, ids: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Our processed scores (B, V): penalty on every row, warpers on sampling rows."""
    pipe = LogitsPipeline.build(params, scores.device, scores.shape[-1])
    out = scores.clone()
    if pipe.penalty is not None:
        apply_repetition_penalty(out, ids, None, pipe.penalty)
    if pipe.sample_rows:
        rows = torch.tensor(pipe.sample_rows)
        out[rows] = pipe.warp(out[rows].clone(), owned=True)
    return out


def random_case(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    return scores, ids


@pytest.mark.parametrize("penalty", [1.0, 0.7, 1.3, 2.0])
def test_warpers_match_transformers_per_param_set(penalty: float) -> None:
    for n, (t, k, p) in enumerate(GRID):
        params = [SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p, repetition_penalty=penalty)] * 3
        scores, ids = random_case(3, 11, seed=n)
        ours = pipeline_scores(scores, ids, params)
        for r in range(3):
            ref = reference_scores(scores[r : r + 1], ids[r : r + 1], params[r])
            torch.testing.assert_close(ours[r : r + 1], ref, rtol=0, atol=0, msg=f"{params[r]}")


def test_mixed_rows_match_transformers() -> None:
    rng = random.Random(0)
    for trial in range(20):
        B = rng.randint(1, 8)
        params = [
            SamplingParams(
                do_sample=rng.random() < 0.7,
                temperature=rng.choice([0.5, 1.0, 1.3]),
                top_k=rng.choice([0, 1, 3, 40]),
                top_p=rng.choice([0.2, 0.8, 1.0]),
                repetition_penalty=rng.choice([1.0, 1.0, 1.2, 0.8]),
            )
            for _ in range(B)
        ]
        scores, ids = random_case(B, rng.randint(1, 20), seed=100 + trial)
        ours = pipeline_scores(scores, ids, params)
        for r, p in enumerate(params):
            ref = reference_scores(scores[r : r + 1], ids[r : r + 1], p)
            torch.testing.assert_close(ours[r : r + 1], ref, rtol=0, atol=0, msg=f"row {r}: {p}")


def test_repetition_penalty_with_mask_matches_prompt_ignore_length() -> None:
    B, T = 5, 12
    scores, ids = random_case(B, T, seed=7)
    pads = torch.tensor([0, 3, 7, 11, 12])  # left padding; the last row is all padding
    mask = torch.arange(T)[None, :] >= pads[:, None]
    ids = torch.where(mask, ids, torch.full_like(ids, V - 1))  # pad id that occurs nowhere else
    ids[mask & (ids == V - 1)] = 0
    penalty = torch.full((B, 1), 1.5)
    ours = apply_repetition_penalty(scores.clone(), ids, mask, penalty)
    ref = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=pads)(ids, scores.clone())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(ours[-1], scores[-1], rtol=0, atol=0)  # nothing valid: untouched
    assert ours[1, V - 1] == scores[1, V - 1]  # the pad id is not penalised


def test_repetition_penalty_ignores_out_of_range_ids_and_repeats() -> None:
    scores = torch.tensor([[2.0, -2.0, 4.0, 1.0]])
    ids = torch.tensor([[0, 1, 0, 0, 7, -1]])
    out = apply_repetition_penalty(scores.clone(), ids, None, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -4.0, 4.0, 1.0]]


def test_greedy_is_argmax_and_does_not_touch_scores() -> None:
    scores, ids = random_case(6, 5, seed=3)
    before = scores.clone()
    out = select_next_tokens(scores, ids, None, SamplingParams(), [None] * 6)
    assert torch.equal(out, scores.argmax(-1))
    assert out.dtype == torch.long and out.shape == (6,)
    pen = SamplingParams(repetition_penalty=1.3)
    out = select_next_tokens(scores, ids, None, pen, None)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()).argmax(-1)
    assert torch.equal(out, ref)
    assert torch.equal(scores, before)


def test_low_precision_scores_are_processed_in_float32() -> None:
    scores, ids = random_case(4, 6, seed=9)
    half = scores.to(torch.bfloat16)
    p = SamplingParams(repetition_penalty=1.2)
    out = select_next_tokens(half, ids, None, p)
    assert torch.equal(out, select_next_tokens(half.float(), ids, None, p))


def test_top_k_one_equals_greedy() -> None:
    scores, ids = random_case(8, 4, seed=11)
    params = [SamplingParams(do_sample=True, top_k=1, temperature=0.7, seed=s) for s in range(8)]
    gens = make_generators(params)
    for _ in range(3):
        out = select_next_tokens(scores, ids, None, params, gens)
        assert torch.equal(out, scores.argmax(-1))


def test_seeded_sampling_is_reproducible_per_row() -> None:
    scores, ids = random_case(4, 4, seed=12)
    scores = scores / 10  # flat distribution: draws differ between seeds

    def run(seeds: list[int]) -> torch.Tensor:
        params = [SamplingParams(do_sample=True, seed=s) for s in seeds]
        gens = make_generators(params)
        return torch.stack([select_next_tokens(scores, ids, None, params, gens) for _ in range(20)], 1)

    a, b, c = run([1, 2, 3, 4]), run([1, 2, 3, 4]), run([5, 2, 6, 4])
    assert torch.equal(a, b)
    assert torch.equal(a[1], c[1]) and torch.equal(a[3], c[3])  # a row depends only on its own seed
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])
    # A row draws the same tokens alone as in a batch.
    alone = SamplingParams(do_sample=True, seed=3)
    g = make_generators([alone])
    solo = torch.stack([select_next_tokens(scores[2:3], ids[2:3], None, [alone], g) for _ in range(20)], 1)
    assert torch.equal(solo[0], a[2])


def test_unseeded_rows_follow_the_global_rng() -> None:
    scores, ids = random_case(3, 4, seed=13)
    p = SamplingParams(do_sample=True, top_p=0.9)

    def run(shared: bool) -> torch.Tensor:
        torch.manual_seed(1234)
        gens = [None] * 3 if shared else make_generators([p] * 3)
        return torch.stack([select_next_tokens(scores / 5, ids, None, p, gens) for _ in range(10)], 1)

    assert torch.equal(run(True), run(True))
    assert torch.equal(run(False), run(False))
    # Without generators the batch is one multinomial call on the global RNG, as in transformers.
    torch.manual_seed(99)
    ours = select_next_tokens(scores, ids, None, p)
    torch.manual_seed(99)
    ref = torch.multinomial(reference_scores(scores, ids, p).softmax(-1), 1).squeeze(1)
    assert torch.equal(ours, ref)


def test_mixed_greedy_and_sampling_rows() -> None:
    scores, ids = random_case(5, 4, seed=14)
    greedy = SamplingParams(repetition_penalty=1.1)
    params = [greedy, SamplingParams(do_sample=True, seed=0), greedy, SamplingParams(do_sample=True), greedy]
    gens = make_generators(params)
    assert gens[0] is None and gens[1] is not None
    ref = RepetitionPenaltyLogitsProcessor(1.1)(ids, scores.clone()).argmax(-1)
    for mixed_gens in (gens, [None, gens[1], None, None, None]):
        out = select_next_tokens(scores, ids, None, params, mixed_gens)
        assert torch.equal(out[[0, 2, 4]], ref[[0, 2, 4]])
        assert ((out >= 0) & (out < V)).all()


def test_sampling_respects_filters() -> None:
    scores, ids = random_case(2, 3, seed=15)
    p = SamplingParams(do_sample=True, top_k=3, seed=0)
    gens = make_generators([p, p])
    top3 = scores.topk(3, dim=-1).indices
    for _ in range(50):
        out = select_next_tokens(scores, ids, None, p, gens)
        assert (top3 == out[:, None]).any(-1).all()


def test_sampling_distribution_follows_softmax() -> None:
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    p = SamplingParams(do_sample=True, seed=0)
    gens = make_generators([p])
    draws = torch.stack([select_next_tokens(scores, None, None, [p], gens) for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 3000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.04, rtol=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-2.0), "repetition_penalty"),
    ],
)
def test_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate()
    with pytest.raises(ValueError, match=field):
        select_next_tokens(torch.zeros(1, V), None, None, SamplingParams(**kwargs))


def test_validation_accepts_greedy_temperature_zero() -> None:
    SamplingParams(do_sample=False, temperature=0.0).validate()


def test_from_generation_config() -> None:
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=True, top_p=0.3, top_k=0, temperature=None)
    p = SamplingParams.from_generation_config(gc)
    assert p == SamplingParams(do_sample=True, top_p=0.3, top_k=0, temperature=1.0)
    assert SamplingParams.from_generation_config(GenerationConfig()) == SamplingParams()
    d = {"do_sample": 1, "temperature": 0.5, "repetition_penalty": None, "chat_format": "chatml"}
    assert SamplingParams.from_generation_config(d, top_k=5, seed=3, top_p=None) == SamplingParams(
        do_sample=True, temperature=0.5, top_k=5, seed=3
    )
    assert SamplingParams.from_generation_config(None) == SamplingParams()
    with pytest.raises(TypeError, match="beams"):
        SamplingParams.from_generation_config(gc, beams=2)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="generators"):
        select_next_tokens(torch.zeros(2, V), None, None, SamplingParams(do_sample=True), [None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    scores, ids = random_case(4, 6, seed=16)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False
    greedy = SamplingParams(repetition_penalty=1.4)
    cpu = select_next_tokens(scores, ids, mask, greedy)
    gpu = select_next_tokens(scores.cuda(), ids.cuda(), mask.cuda(), greedy)
    assert torch.equal(cpu, gpu.cpu())
    params = [SamplingParams(do_sample=True, top_k=5, top_p=0.8, seed=i) for i in range(3)] + [greedy]
    gens = make_generators(params, "cuda")
    out = select_next_tokens(scores.cuda(), ids.cuda(), mask.cuda(), params, gens)
    assert out.device.type == "cuda" and out.shape == (4,) and out[3].item() == cpu[3].item()
