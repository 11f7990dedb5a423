"""Configs other than the golden one: every config.json field drives the model.

A second config (wider, more heads, biases, tied embeddings, another eps, rotary
base, partial rotary, short seq_length so that dynamic NTK and log-n fire, a
224-pixel vision tower) is built with random weights, saved in another layout and
dtype, loaded back, and checked against a plain re-derivation of the math, the
KV cache, and batching.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import max_abs
from naive_reference import naive_logits
from PIL import Image

import qwen_vl
from qwen_vl.engine.kv_cache import KVCache
from qwen_vl.model.saving import save_checkpoint

SECOND_CONFIG = dict(
    hidden_size=256,
    num_attention_heads=8,
    kv_channels=32,
    num_hidden_layers=3,
    intermediate_size=512,
    no_bias=False,
    tie_word_embeddings=True,
    layer_norm_epsilon=1e-5,
    rotary_emb_base=50000,
    rotary_pct=0.5,
    seq_length=24,
    max_position_embeddings=512,
    visual=dict(image_size=224, patch_size=14, width=48, layers=1, heads=3, mlp_ratio=2.0, output_dim=256),
)
IMG = 151857


def random_model(**overrides) -> qwen_vl.QWenLMHeadModel:
    torch.manual_seed(0)
    config = qwen_vl.QWenConfig(**{**SECOND_CONFIG, **overrides})
    model = qwen_vl.QWenLMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def second_model(tmp_path_factory) -> qwen_vl.QWenLMHeadModel:
    """The second config saved as bf16 sharded safetensors, loaded back in float32."""
    original = random_model()
    out = tmp_path_factory.mktemp("second")
    save_checkpoint(original, out, safe_serialization=True, max_shard_bytes=30_000_000, dtype=torch.bfloat16)
    assert (out / "model.safetensors.index.json").is_file()
    return qwen_vl.QWenLMHeadModel.from_pretrained(out, torch_dtype=torch.float32)


def image_span(tag_bytes: bytes) -> list[int]:
    return [IMG, *tag_bytes, *[IMG + 2] * (256 - len(tag_bytes)), IMG + 1]


def test_config_fields_shape_the_model(second_model):
    cfg = second_model.config
    assert cfg.rotary_dim == 16 and cfg.ffn_hidden_size == 256
    assert second_model.lm_head.weight is second_model.transformer.wte.weight
    assert second_model.transformer.h[0].mlp.w1.bias is not None
    assert second_model.transformer.h[0].ln_1.eps == 1e-5
    assert len(second_model.transformer.h) == 3


@pytest.mark.parametrize("length", [10, 30, 60])
def test_matches_plain_rederivation(second_model, length):
    """Lengths below, above and far above seq_length (24): NTK alpha 1, 3, 7 and log-n."""
    ids = torch.randint(0, 150000, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    with torch.no_grad():
        ours = second_model(torch.tensor([ids])).logits[0]
    assert max_abs(ours, naive_logits(second_model, ids)) <= 1e-4


def test_golden_config_matches_plain_rederivation(fp32_model):
    ids = list(range(1000, 1040))
    with torch.no_grad():
        ours = fp32_model(torch.tensor([ids])).logits[0]
    assert max_abs(ours, naive_logits(fp32_model, ids)) <= 1e-4


@pytest.mark.parametrize("model_name", ["second_model", "fp32_model"])
def test_incremental_decoding_equals_full_forward(model_name, request):
    """Prefill 40 tokens, then decode 8 one at a time (same NTK alpha as 48 at once)."""
    model = request.getfixturevalue(model_name)
    cfg = model.config
    ids = torch.randint(0, 150000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(cfg.num_hidden_layers, 2, cfg.num_attention_heads, cfg.head_dim, 48, torch.float32, "cpu")
        parts = [model(ids[:, :40], kv_cache=cache).logits]
        parts += [model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(40, 48)]
    assert max_abs(torch.cat(parts, 1), full) <= 1e-4


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_generate_equals_one_at_a_time(second_model, padding_side):
    prompts = [
        [1, 2, 3, *image_span(b"a.png"), 9, 10],
        list(range(100, 140)),
        [5, *image_span(b"b c.png"), *range(200, 230)],
    ]
    images = {0: [random_image(0, (60, 40))], 1: [], 2: [random_image(1, (30, 90))]}
    kwargs = dict(do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    singles = []
    for i, p in enumerate(prompts):
        out = second_model.generate(torch.tensor([p]), images=images[i], **kwargs)
        singles.append(out[0, len(p) :].tolist())
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(T - len(p), T) if padding_side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    all_images = images[0] + images[1] + images[2]
    batched = second_model.generate(ids, attention_mask=mask, images=all_images, **kwargs)
    assert [row[T:].tolist() for row in batched] == singles


def test_sampling_is_seeded(second_model):
    ids = torch.tensor([list(range(300, 320))])
    kw = dict(do_sample=True, top_p=0.9, temperature=1.5, max_new_tokens=8, eos_token_id=None)
    a = second_model.generate(ids, seed=7, **kw)
    b = second_model.generate(ids, seed=7, **kw)
    c = second_model.generate(ids, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_float16_long_prompt_matches_float32():
    """A prompt past seq_length (NTK + log-n active) in float16 stays close to float32."""
    model = random_model()
    ids = torch.randint(0, 150000, (1, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        half = model.half()(ids).logits.float()
    assert max_abs(half, ref) <= 0.02 * float(ref.abs().max())


def test_float16_attention_overflow_stays_finite():
    """q·k beyond float16's range (65504) overflowed the reference to inf and then NaN;
    here the logits stay finite."""
    model = random_model()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(80.0)
    ids = torch.randint(0, 150000, (1, 80), generator=torch.Generator().manual_seed(3))
    qkv = []
    hook = model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: qkv.append(o))
    with torch.no_grad():
        model(ids)
        hook.remove()
        q, k, _ = qkv[0][0].split(model.config.hidden_size, dim=-1)  # (T, C) each
        head = model.config.head_dim
        peak = float((q[:, :head] @ k[:, :head].T).abs().max())
        assert peak > 65504  # the stress is real: this product overflows float16
        half = model.half()(ids).logits
    assert torch.isfinite(half).all()
