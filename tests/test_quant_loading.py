"""Loading Int4 GPTQ checkpoints in the official layout, written here by an independent
writer (plain-Python bit packing, AutoGPTQ's file names and config fields), and the
choice of the int4 kernel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT_DIR
from safetensors.torch import save_file
from test_quant_format import loop_pack_qweight, loop_pack_qzeros, make_layer
from torch import nn

import qwen_vl
from qwen_vl.model.loading import CheckpointError
from qwen_vl.quant import kernels
from qwen_vl.quant.linear import QuantLinear
from qwen_vl.quant.packing import default_g_idx

GROUP = 128
LLM_LINEARS = [
    f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
]
QUANTIZE_CONFIG = {
    "bits": 4,
    "group_size": GROUP,
    "damp_percent": 0.01,
    "desc_act": False,
    "static_groups": False,
    "sym": False,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
}


def quantize_simply(w: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max rounding per group (the last group may be shorter): codes (out, in),
    float16 scales (G, out), zero points (G, out) in 1..16."""
    out, inn = w.shape
    codes = torch.zeros(out, inn, dtype=torch.int64)
    scales, zeros = [], []
    for c in range(0, inn, gs):
        g = w[:, c : c + gs]
        lo, hi = g.min(1).values.clamp(max=0), g.max(1).values.clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-4).half()
        z = torch.round(-lo / s.float()).clamp(1, 16)
        codes[:, c : c + gs] = torch.clamp(torch.round(g / s.float()[:, None]) + z[:, None], 0, 15).long()
        scales.append(s)
        zeros.append(z.long())
    return codes, torch.stack(scales), torch.stack(zeros)


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The golden model with every decoder linear layer in AutoGPTQ's layout (two safetensors
    shards and an index, biases in float16 as AutoGPTQ writes them); also returns the weights
    (out, in) the quantized layers mean."""
    out_dir = tmp_path_factory.mktemp("int4")
    float_model = qwen_vl.QWenLMHeadModel.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32)
    state = {k: v.to(torch.float16) for k, v in float_model.state_dict().items()}
    meant: dict[str, torch.Tensor] = {}
    for name in LLM_LINEARS:
        w = state.pop(f"{name}.weight").float()
        codes, scales, zeros = quantize_simply(w, GROUP)
        g_idx = [k // GROUP for k in range(w.shape[1])]
        state[f"{name}.qweight"] = torch.tensor(loop_pack_qweight(codes.t().tolist()), dtype=torch.int32)
        state[f"{name}.qzeros"] = torch.tensor(loop_pack_qzeros(zeros.tolist()), dtype=torch.int32)
        state[f"{name}.scales"] = scales
        state[f"{name}.g_idx"] = torch.tensor(g_idx, dtype=torch.int32)
        meant[name] = torch.stack(
            [scales[g].float() * (codes[:, k] - zeros[g]).float() for k, g in enumerate(g_idx)], dim=1
        )
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(out_dir / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {**QUANTIZE_CONFIG, "quant_method": "gptq"}
    (out_dir / "config.json").write_text(json.dumps(config))
    (out_dir / "quantize_config.json").write_text(json.dumps(QUANTIZE_CONFIG))
    for name in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(CHECKPOINT_DIR / name, out_dir / name)
    return out_dir, meant


def test_official_layout_loads_as_the_weights_it_means(int4_checkpoint) -> None:
    ckpt, meant = int4_checkpoint
    model = qwen_vl.QWenLMHeadModel.from_pretrained(ckpt, dtype=torch.float32)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(LLM_LINEARS)
    assert all(type(m) is nn.Linear for m in model.transformer.visual.modules() if isinstance(m, nn.Linear))
    assert type(model.lm_head) is nn.Linear
    c_proj = model.get_submodule("transformer.h.0.mlp.c_proj")
    assert c_proj.scales.shape == (3, 128) and c_proj.scales.dtype == torch.float16  # 344 inputs: 128 + 128 + 88
    assert c_proj.kernel == "reference"
    reference = qwen_vl.QWenLMHeadModel.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())  # the file holds every float tensor in float16
        for name, w in meant.items():
            reference.get_submodule(name).weight.copy_(w)
    for name in LLM_LINEARS:
        torch.testing.assert_close(model.get_submodule(name).dequantize(), meant[name], rtol=0, atol=0)
    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_checkpoint_decides_which_layers_are_quantized(int4_checkpoint, tmp_path: Path) -> None:
    ckpt, _ = int4_checkpoint
    from safetensors.torch import load_file

    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(f))
    # one layer left in float, another without g_idx (older AutoGPTQ files): both load
    w = torch.zeros(384, 128, dtype=torch.float16)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        del state[f"transformer.h.1.attn.c_attn.{key}"]
    state["transformer.h.1.attn.c_attn.weight"] = w
    del state["transformer.h.0.mlp.w1.g_idx"]
    save_file(state, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "quantize_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy(ckpt / name, tmp_path / name)
    model = qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(model.get_submodule("transformer.h.1.attn.c_attn")) is nn.Linear
    w1 = model.get_submodule("transformer.h.0.mlp.w1")
    assert torch.equal(w1.g_idx, default_g_idx(128, GROUP)) and "g_idx" not in w1.state_dict()
    assert model.get_submodule("transformer.h.0.attn.c_attn").bias.dtype == torch.bfloat16
    # a GPTQ config without any quantized tensor, and a wrong group size, are loud errors
    (tmp_path / "model.safetensors").unlink()
    save_file(
        {k: v for k, v in state.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="declares GPTQ quantization but no '<layer>.qweight'"):
        qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path)
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "quantize_config.json").unlink()
    (tmp_path / "model.safetensors").unlink()
    for f in ckpt.glob("*.safetensors*"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(ckpt / "model.safetensors.index.json", tmp_path)
    with pytest.raises(
        CheckpointError, match=r"transformer.h.0.attn.c_attn.scales: checkpoint \(1, 384\) vs model \(4, 384\)"
    ):
        qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path)


# ----- kernels ---------------------------------------------------------------
def test_cpu_runs_the_reference_kernel(int4_checkpoint) -> None:
    layer = make_layer(256, 64, 32)
    assert kernels.select_kernel(layer, "cpu", torch.bfloat16) == "reference"
    assert kernels.select_kernel(layer, "cpu", torch.float32, "reference") == "reference"
    with pytest.raises(ValueError, match="unknown int4 kernel 'marlin'"):
        kernels.select_kernel(layer, "cpu", torch.float32, "marlin")
    ckpt, _ = int4_checkpoint
    with pytest.raises(
        ValueError, match="tinygemm int4 kernel cannot run this layer on cpu: (in_features 344|out_features 344)"
    ):
        qwen_vl.QWenLMHeadModel.from_pretrained(ckpt, quant_kernel="tinygemm")


@pytest.fixture
def fake_gpu(monkeypatch):
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    return capability


def test_cuda_selection_logic(fake_gpu) -> None:
    layer = make_layer(256, 64, 32)
    assert kernels.select_kernel(layer, "cuda", torch.bfloat16) == "tinygemm"
    assert kernels.select_kernel(layer, "cuda", torch.float16) == "tinygemm"
    assert kernels.select_kernel(layer, "cuda", torch.float32) == "reference"  # float32 stays exact
    assert kernels.select_kernel(make_layer(256, 64, 16), "cuda", torch.bfloat16) == "reference"  # group 16
    assert kernels.select_kernel(make_layer(48, 64, 16), "cuda", torch.bfloat16) == "reference"
    uneven = make_layer(256, 64, 32)
    uneven.g_idx = torch.tensor([0] * 40 + [1] * 24 + [k // 32 for k in range(64, 256)], dtype=torch.int32)
    assert kernels.tinygemm_problem(uneven, torch.device("cuda")) == "g_idx has groups of unequal size"
    fake_gpu["value"] = (7, 5)
    assert kernels.select_kernel(layer, "cuda", torch.bfloat16) == "reference"
    with pytest.raises(ValueError, match="compute capability is below 8.0"):
        kernels.select_kernel(layer, "cuda", torch.bfloat16, "tinygemm")


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_tinygemm_conversion_matches_the_reference(act_order: bool, group_size: int) -> None:
    layer = make_layer(256, 64, group_size, seed=group_size)
    if act_order:
        layer.g_idx = layer.g_idx[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    x = torch.randn(7, 256)
    expected = layer(x)  # reference kernel
    assert layer.use_kernel("tinygemm", torch.float32) == "tinygemm"
    assert (layer._tinygemm.perm is not None) == act_order
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.use_kernel("tinygemm", torch.bfloat16)
    torch.testing.assert_close(layer(x.bfloat16()).float(), expected, rtol=0.02, atol=0.06)
    x.requires_grad_(True)
    layer.use_kernel("tinygemm", torch.float32)
    layer(x).sum().backward()  # training goes through the reference path
    assert x.grad is not None


def test_tinygemm_layout_pieces() -> None:
    codes = torch.tensor([[1, 2, 15, 0], [7, 8, 3, 12]])
    # the CUDA op's input: two inputs per byte, the even one in the high nibble
    assert kernels.pair_nibbles(codes).tolist() == [[0x12, 0xF0], [0x78, 0x3C]]
    scales = torch.tensor([[0.5, 0.25]]).half()
    zeros = torch.tensor([[3, 11]])
    sz = kernels.tinygemm_scales_and_zeros(scales, zeros, torch.float32)  # (1, 2, 2)
    for q in range(16):  # tinygemm's (q - 8) * s + o equals GPTQ's s * (q - z)
        for n in range(2):
            assert (q - 8) * sz[0, n, 0] + sz[0, n, 1] == scales[0, n].float() * (q - zeros[0, n])
    assert kernels.inner_k_tiles(11008) == 8 and kernels.inner_k_tiles(4096) == 8 and kernels.inner_k_tiles(96) == 2
    assert kernels.inner_k_tiles(344) is None
