"""The vision tower against the golden encoder outputs, plus its structure:
official key names, meta-device construction, attention layouts, init, and
gradient checkpointing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN_DIR
from PIL import Image

from qwen_vl.images import ImagePolicy, image_transform, load_image
from qwen_vl.model import vision
from qwen_vl.model.vision import (
    PoolAttention,
    VisionTransformer,
    VisualAttention,
    interpolate_pos_embed,
    sincos_pos_embed_2d,
)

PREFIX = "transformer.visual."
#: Visual outputs: max |ours - golden| <= REL_TOL * max(1, max |golden|) (README: ~1e-5 relative).
REL_TOL = 1e-5
SMALL = dict(image_size=56, patch_size=14, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=128)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _visual_only_cases() -> list[dict]:
    path = GOLDEN_DIR / "visual_only" / "cases.json"
    return _json(path)["images"] if path.is_file() else []


def _checkpoint_images() -> list[dict]:
    """One entry per distinct image of the model cases (path + visual_output)."""
    path = GOLDEN_DIR / "model_cases.json"
    if not path.is_file():
        return []
    seen: dict[str, dict] = {}
    for case in _json(path)["cases"]:
        for image in case.get("images", []):
            seen.setdefault(image["path"], image)
    return list(seen.values())


def checkpoint_visual_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The ``transformer.visual.*`` tensors of the sharded checkpoint, float32, prefix removed."""
    weight_map = _json(checkpoint_dir / "pytorch_model.bin.index.json")["weight_map"]
    shards = sorted({f for k, f in weight_map.items() if k.startswith(PREFIX)})
    state = {}
    for shard in shards:
        tensors = torch.load(checkpoint_dir / shard, weights_only=True, mmap=True, map_location="cpu")
        state.update({k.removeprefix(PREFIX): v.float() for k, v in tensors.items() if k.startswith(PREFIX)})
    assert len(state) == sum(k.startswith(PREFIX) for k in weight_map)
    return state


def build_loaded(config: dict, state: dict[str, torch.Tensor]) -> VisionTransformer:
    with torch.device("meta"):
        model = VisionTransformer(**config)
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


@pytest.fixture(scope="module")
def visual_only_model(golden_dir: Path) -> VisionTransformer:
    config = _json(golden_dir / "visual_only" / "visual_config.json")
    raw = torch.load(golden_dir / "visual_only" / "visual_weights.bin", weights_only=True, map_location="cpu")
    assert all(k.startswith(PREFIX) for k in raw)
    return build_loaded(config, {k.removeprefix(PREFIX): v.float() for k, v in raw.items()})


@pytest.fixture(scope="module")
def checkpoint_model(checkpoint_dir: Path) -> VisionTransformer:
    config = _json(checkpoint_dir / "config.json")["visual"]
    return build_loaded(config, checkpoint_visual_state(checkpoint_dir))


def pixels_of(golden_dir: Path, relative: str, size: int) -> torch.Tensor:
    image = load_image(golden_dir / relative, ImagePolicy(allowed_roots=(golden_dir,)))
    return image_transform(image, size).unsqueeze(0)  # (1, 3, S, S)


def assert_close_to_golden(out: torch.Tensor, ref: np.ndarray) -> float:
    assert tuple(out.shape) == ref.shape
    assert out.dtype == torch.float32
    diff = float(np.abs(out.numpy().astype(np.float64) - ref.astype(np.float64)).max())
    bound = REL_TOL * max(1.0, float(np.abs(ref).max()))
    assert diff <= bound, f"max |diff| {diff:.3e} > {bound:.3e}"
    return diff


def assert_output_stats(out: torch.Tensor, mean: float, std: float, first16: list[float]) -> None:
    x = out.double()
    assert abs(x.mean().item() - mean) <= REL_TOL * max(1.0, abs(mean))
    assert abs(x.std().item() - std) <= REL_TOL * max(1.0, abs(std))
    np.testing.assert_allclose(x.flatten()[:16].numpy(), first16, rtol=0, atol=REL_TOL * 10)


# ----- golden comparisons -----------------------------------------------------


@pytest.mark.parametrize("case", _visual_only_cases(), ids=lambda c: Path(c["path"]).stem)
def test_visual_only_matches_golden(visual_only_model, golden_dir, case):
    size = _json(golden_dir / "visual_only" / "visual_config.json")["image_size"]
    with torch.no_grad():
        out = visual_only_model(pixels_of(golden_dir, case["path"], size))[0]  # (256, output_dim)
    assert list(out.shape) == case["output_shape"]
    assert_close_to_golden(out, np.load(golden_dir / case["output_file"]))
    assert_output_stats(out, case["output_mean"], case["output_std"], case["output_first16"])


def test_visual_only_resampler_heads(visual_only_model, golden_dir):
    expected = _json(golden_dir / "visual_only" / "cases.json")["resampler_num_heads"]
    assert visual_only_model.attn_pool.attn.heads == expected


@pytest.mark.parametrize("image", _checkpoint_images(), ids=lambda c: Path(c["path"]).stem)
def test_checkpoint_visual_matches_golden(checkpoint_model, golden_dir, checkpoint_dir, image):
    size = _json(checkpoint_dir / "config.json")["visual"]["image_size"]
    with torch.no_grad():
        out = checkpoint_model(pixels_of(golden_dir, image["path"], size))[0]  # (256, hidden)
    stats = image["visual_output"]
    assert list(out.shape) == stats["shape"]
    assert_close_to_golden(out, np.load(golden_dir / stats["file"]))
    assert_output_stats(out, stats["mean"], stats["std"], stats["first16"])


def test_checkpoint_covers_every_visual_file(golden_dir):
    files = {Path(i["visual_output"]["file"]).name for i in _checkpoint_images()}
    assert files == {p.name for p in (golden_dir / "visual").glob("*.npy")}


def test_batch_equals_single_images(checkpoint_model, golden_dir, checkpoint_dir):
    size = _json(checkpoint_dir / "config.json")["visual"]["image_size"]
    images = _checkpoint_images()[:3]
    batch = torch.cat([pixels_of(golden_dir, i["path"], size) for i in images])  # (3, 3, S, S)
    with torch.no_grad():
        together = checkpoint_model(batch)
        for row, image in zip(together, images):
            assert_close_to_golden(row, np.load(golden_dir / image["visual_output"]["file"]))


def test_encode_images_equals_transform_then_forward(checkpoint_model, golden_dir):
    image = Image.open(golden_dir / "images" / "shapes_rgb_448x448.png")
    out = checkpoint_model.encode_images([image, image])
    assert out.shape == (2, 256, checkpoint_model.output_dim)
    assert_close_to_golden(out[1], np.load(golden_dir / "visual" / "shapes_rgb_448x448.npy"))


# ----- structure and loading ---------------------------------------------------


def test_meta_construction_and_exact_key_set(checkpoint_dir):
    config = _json(checkpoint_dir / "config.json")["visual"]
    with torch.device("meta"):
        model = VisionTransformer(**config)
    assert all(t.is_meta for t in model.state_dict().values())
    weight_map = _json(checkpoint_dir / "pytorch_model.bin.index.json")["weight_map"]
    expected = {k.removeprefix(PREFIX) for k in weight_map if k.startswith(PREFIX)}
    assert set(model.state_dict()) == expected
    assert "attn_pool.pos_embed" in expected


def test_assign_load_leaves_nothing_on_meta(checkpoint_model):
    tensors = [*checkpoint_model.parameters(), *checkpoint_model.buffers()]
    assert tensors and not any(t.is_meta for t in tensors)
    assert all(t.dtype == torch.float32 for t in tensors)


def test_pos_embed_comes_from_the_checkpoint(checkpoint_model, checkpoint_dir):
    state = checkpoint_visual_state(checkpoint_dir)
    loaded = checkpoint_model.attn_pool.pos_embed
    assert torch.equal(loaded, state["attn_pool.pos_embed"])
    # The stored values were perturbed away from the sin-cos initialisation.
    assert not torch.allclose(loaded, sincos_pos_embed_2d(loaded.shape[1], 16), atol=1e-2)


def test_strict_loading_fails_on_missing_keys(checkpoint_dir):
    config = _json(checkpoint_dir / "config.json")["visual"]
    state = checkpoint_visual_state(checkpoint_dir)
    del state["proj"], state["attn_pool.pos_embed"]
    with torch.device("meta"):
        model = VisionTransformer(**config)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*attn_pool\.pos_embed"):
        model.load_state_dict(state, strict=True, assign=True)


def test_kv_proj_is_identity_when_width_equals_output_dim():
    with torch.device("meta"):
        same = VisionTransformer(**{**SMALL, "width": 128})
        other = VisionTransformer(**SMALL)
    assert not any(k.startswith("attn_pool.kv_proj") for k in same.state_dict())
    assert isinstance(same.attn_pool.kv_proj, torch.nn.Identity)
    assert other.state_dict()["attn_pool.kv_proj.weight"].shape == (128, 32)


def test_sizes_follow_the_config(checkpoint_dir):
    config = _json(checkpoint_dir / "config.json")["visual"]
    with torch.device("meta"):
        model = VisionTransformer(**config)
    block = model.transformer.resblocks[0]
    assert block.mlp.c_fc.out_features == int(config["width"] * config["mlp_ratio"]) == 315
    assert model.attn_pool.attn.heads == config["output_dim"] // 128
    assert model.positional_embedding.shape == (256, config["width"])
    assert model.proj.shape == (config["output_dim"], config["output_dim"])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 + 2 * config["layers"] + 1 and all(n.eps == 1e-6 for n in norms)
    assert all(
        isinstance(m.mlp.gelu, torch.nn.GELU) and m.mlp.gelu.approximate == "none" for m in model.transformer.resblocks
    )


def test_unused_config_keys_are_accepted():
    with torch.device("meta"):
        VisionTransformer(**SMALL, image_start_id=5, some_future_key=1)


# ----- math of the parts -----------------------------------------------------------


def test_visual_attention_uses_per_head_qkv_layout():
    torch.manual_seed(0)
    width, heads = 24, 3
    attn = VisualAttention(width, heads)
    x = torch.randn(2, 7, width)
    head_dim = width // heads
    fused = attn.in_proj(x).view(2, 7, heads, 3 * head_dim)  # heads x (q, k, v) x head_dim
    q, k, v = fused.split(head_dim, dim=-1)  # (B, L, H, D) each
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(head_dim)
    out = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(2, 7, width)
    torch.testing.assert_close(attn(x), attn.out_proj(out), rtol=0, atol=1e-6)


def test_pool_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 32, 4
    ours = PoolAttention(dim, heads)
    ours.reset_parameters()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    reference = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    assert set(reference.state_dict()) == set(ours.state_dict())
    reference.load_state_dict(ours.state_dict())
    q, k, v = torch.randn(2, 5, dim), torch.randn(2, 9, dim), torch.randn(2, 9, dim)
    expected = reference(q, k, v, need_weights=False)[0]
    torch.testing.assert_close(ours(q, k, v), expected, rtol=0, atol=1e-6)


def test_interpolate_pos_embed():
    pos = torch.randn(256, 8, dtype=torch.bfloat16)
    assert interpolate_pos_embed(pos, 256) is pos
    resized = interpolate_pos_embed(pos, 1024)
    assert resized.shape == (1024, 8) and resized.dtype == torch.bfloat16
    constant = torch.full((256, 4), 0.75)
    torch.testing.assert_close(interpolate_pos_embed(constant, 64), torch.full((64, 4), 0.75))


def test_sincos_pos_embed_layout():
    grid, dim = 4, 16
    emb = sincos_pos_embed_2d(dim, grid).view(grid, grid, dim)  # (y, x, dim)
    half = dim // 2
    assert torch.equal(emb[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    # First half of the channels follows the column, second half the row.
    assert torch.equal(emb[:, :, :half], emb[:1, :, :half].expand(grid, grid, half))
    assert torch.equal(emb[:, :, half:], emb[:, :1, half:].expand(grid, grid, half))
    torch.testing.assert_close(emb[0, 1, 0], torch.tensor(math.sin(1.0)))
    torch.testing.assert_close(emb[2, 0, half + 1], torch.tensor(math.sin(2.0 * 10000 ** (-1 / 4))))


# ----- random init, dtype, training -------------------------------------------------


def test_random_init_is_sensible():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL).eval()
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    torch.testing.assert_close(model.attn_pool.pos_embed, sincos_pos_embed_2d(128, 16))
    assert not model.attn_pool.pos_embed.requires_grad
    assert 0.01 < model.attn_pool.query.std() < 0.03
    with torch.no_grad():
        out = model(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 256, 128) and torch.isfinite(out).all()
    assert 0.3 < out.std() < 3


def test_meta_then_init_weights():
    with torch.device("meta"):
        model = VisionTransformer(**SMALL)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.zeros(1, 3, 56, 56))).all()


def test_computes_in_parameter_dtype():
    model = VisionTransformer(**SMALL).to(torch.bfloat16)
    out = model(torch.randn(1, 3, 56, 56))  # float32 input is cast
    assert out.dtype == torch.bfloat16 and out.shape == (1, 256, 128)


def test_gradient_checkpointing_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL).train()
    x = torch.randn(2, 3, 56, 56)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    calls = []
    real = vision.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vision, "checkpoint", counting)
    assert model.gradient_checkpointing is False
    model.gradient_checkpointing = True
    checkpointed = grads()
    assert len(calls) == SMALL["layers"]
    assert plain.keys() == checkpointed.keys() and "conv1.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == SMALL["layers"]  # not used outside training


def test_rejects_bad_configs():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(**{**SMALL, "image_size": 50})
    with pytest.raises(ValueError, match="multiple of 128"):
        VisionTransformer(**{**SMALL, "output_dim": 100})
