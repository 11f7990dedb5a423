"""The AutoGPTQ Int4 layout: bit packing against a plain-Python re-derivation, the "gptq"
(zero - 1) zero-point convention, dequantisation, the quantization config files,
``QuantLinear`` dtype handling, and (when auto_gptq is importable) AutoGPTQ's own packing."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from qwen_vl.quant import packing
from qwen_vl.quant.config import GPTQConfig, QuantConfigError, read_gptq_config
from qwen_vl.quant.linear import QuantLinear


# ----- an independent re-derivation of the format, one bit at a time ---------------
def to_int32(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 value with the same bits."""
    return word - (1 << 32) if word & (1 << 31) else word


def loop_pack_qweight(codes: list[list[int]]) -> list[list[int]]:
    """codes[k][n] (input k, output n) → words[k // 8][n]: bit b of code k lands at bit 4 * (k % 8) + b."""
    rows, cols = len(codes), len(codes[0])
    words = [[0] * cols for _ in range(rows // 8)]
    for k in range(rows):
        for n in range(cols):
            for b in range(4):
                if (codes[k][n] >> b) & 1:
                    words[k // 8][n] |= 1 << (4 * (k % 8) + b)
    return [[to_int32(w) for w in row] for row in words]


def loop_pack_qzeros(zeros: list[list[int]]) -> list[list[int]]:
    """zeros[g][n] → words[g][n // 8] holding zero - 1 at bit 4 * (n % 8) (AutoGPTQ's "gptq" format)."""
    groups, cols = len(zeros), len(zeros[0])
    words = [[0] * (cols // 8) for _ in range(groups)]
    for g in range(groups):
        for n in range(cols):
            stored = zeros[g][n] - 1
            for b in range(4):
                if (stored >> b) & 1:
                    words[g][n // 8] |= 1 << (4 * (n % 8) + b)
    return [[to_int32(w) for w in row] for row in words]


def loop_code(words: list[list[int]], k: int, n: int) -> int:
    """Code of input k, output n read back bit by bit from packed qweight words."""
    word = words[k // 8][n] & 0xFFFFFFFF
    return sum(((word >> (4 * (k % 8) + b)) & 1) << b for b in range(4))


def random_codes(rows: int, cols: int, seed: int, low: int = 0, high: int = 15) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(low, high) for _ in range(cols)] for _ in range(rows)]


# ----- packing ---------------------------------------------------------------
def test_qweight_packing_matches_the_bit_layout() -> None:
    codes = random_codes(32, 24, seed=1)
    codes[7][0] = 15  # top nibble set: the word is negative as int32
    packed = packing.pack_rows(torch.tensor(codes))
    assert packed.dtype == torch.int32 and packed.shape == (4, 24)
    assert packed.tolist() == loop_pack_qweight(codes)
    assert int(packed[0, 0]) < 0
    words = packed.tolist()
    assert [[loop_code(words, k, n) for n in range(24)] for k in range(32)] == codes
    assert packing.unpack_rows(packed).tolist() == codes


def test_qzeros_store_zero_minus_one() -> None:
    zeros = random_codes(3, 16, seed=2, low=1, high=16)
    packed = packing.encode_zeros(torch.tensor(zeros), zero_offset=1)
    assert packed.shape == (3, 2) and packed.tolist() == loop_pack_qzeros(zeros)
    assert packing.decode_zeros(packed, 1).tolist() == zeros
    # a symmetric 4-bit layer: zero point 8 stored as 7 in every nibble, as in AutoGPTQ files
    sym = packing.encode_zeros(torch.full((1, 8), 8), zero_offset=1)
    assert int(sym) == 0x77777777
    with pytest.raises(ValueError, match="zero points must be in 1..16"):
        packing.encode_zeros(torch.zeros(1, 8, dtype=torch.int64), zero_offset=1)
    v2 = packing.encode_zeros(torch.full((1, 8), 8), zero_offset=0)  # gptq_v2 stores the zero itself
    assert int(v2) == to_int32(0x88888888)


def test_pack_rejects_bad_codes_and_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        packing.pack_rows(torch.zeros(12, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="0..15"):
        packing.pack_rows(torch.full((8, 8), 16))
    with pytest.raises(TypeError, match="integer codes"):
        packing.pack_columns(torch.zeros(8, 8))


def test_dequantize_matches_the_formula_with_act_order_g_idx() -> None:
    inn, out, gs = 32, 16, 8
    codes = random_codes(inn, out, seed=3)
    zeros = random_codes(inn // gs, out, seed=4, low=1, high=16)
    rng = random.Random(5)
    scales = torch.tensor([[rng.uniform(0.001, 0.1) for _ in range(out)] for _ in range(inn // gs)]).half()
    g_idx = [k // gs for k in range(inn)]
    rng.shuffle(g_idx)  # act-order: any input may belong to any group
    weight = packing.dequantize(
        torch.tensor(loop_pack_qweight(codes)),
        torch.tensor(loop_pack_qzeros(zeros)),
        scales,
        torch.tensor(g_idx, dtype=torch.int32),
        zero_offset=1,
    )
    assert weight.shape == (out, inn)
    for k in range(inn):
        for n in range(out):
            g = g_idx[k]
            expected = float(scales[g, n]) * (codes[k][n] - zeros[g][n])
            assert float(weight[n, k]) == pytest.approx(expected, abs=1e-7)


# ----- QuantLinear -----------------------------------------------------------
def make_layer(inn: int = 64, out: int = 32, gs: int = 16, seed: int = 0, bias: bool = True) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inn), generator=gen)
    scales = (torch.rand(inn // gs, out, generator=gen) * 0.05 + 0.001).half()
    zeros = torch.randint(1, 17, (inn // gs, out), generator=gen)
    g_idx = packing.default_g_idx(inn, gs)
    b = torch.randn(out, generator=gen) if bias else None
    return QuantLinear.from_codes(codes, scales, zeros, g_idx, b, gs)


def test_quant_linear_is_a_linear_layer_with_the_dequantized_weight() -> None:
    layer = make_layer()
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert list(layer.parameters()) == []
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantize())
        dense.bias.copy_(layer.bias)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)
    x.requires_grad_(True)
    layer(x).sum().backward()  # gradients reach the input through the frozen layer
    torch.testing.assert_close(x.grad, dense.weight.sum(0).expand(2, 5, 64), rtol=1e-5, atol=1e-6)


def test_model_dtype_changes_never_touch_the_scales() -> None:
    layer = make_layer()
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16 and layer.qweight.dtype == torch.int32
    layer.float()
    assert layer.scales.dtype == torch.float16
    y = layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# ----- config files ----------------------------------------------------------
OFFICIAL = {
    "bits": 4,
    "group_size": 128,
    "damp_percent": 0.01,
    "desc_act": False,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
}


def test_read_gptq_config_from_either_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    assert read_gptq_config(tmp_path) is None
    (tmp_path / "quantize_config.json").write_text(json.dumps(OFFICIAL))  # AutoGPTQ 0.4: no quant_method
    config = read_gptq_config(tmp_path)
    assert config == GPTQConfig(bits=4, group_size=128, sym=True, desc_act=False)
    assert config.zero_offset == 1
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {**OFFICIAL, "quant_method": "gptq", "desc_act": True}})
    )
    with pytest.raises(QuantConfigError, match=r"disagree \(desc_act: True vs False\)"):
        read_gptq_config(tmp_path)
    (tmp_path / "quantize_config.json").unlink()
    assert read_gptq_config(tmp_path).desc_act is True
    assert GPTQConfig.from_dict({**OFFICIAL, "quant_method": "gptq"}).to_dict() == {
        **OFFICIAL,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 8}, "bits=8 is not supported: qwen-vl runs and writes 4-bit GPTQ only"),
        ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
        ({"group_size": 0}, "group_size must be a positive integer or -1"),
        ({"sym": "yes"}, "sym must be true or false"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ],
)
def test_unsupported_configs_name_the_field(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {**OFFICIAL, **change}}))
    with pytest.raises(QuantConfigError, match=message) as info:
        read_gptq_config(tmp_path)
    assert "quantization_config" in str(info.value)


# ----- AutoGPTQ's own packing, when it can be imported --------------------------
def _autogptq_qlinear():
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "nn_modules" / "qlinear" / "qlinear_cuda.py"
    module_spec = importlib.util.spec_from_file_location("_autogptq_qlinear_cuda", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the file alone: no CUDA extension, no package imports
    return module.QuantLinear


@pytest.mark.skipif(importlib.util.find_spec("auto_gptq") is None, reason="auto_gptq is not installed")
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_autogptq_pack_and_dequantisation(act_order: bool) -> None:
    AutoQuantLinear = _autogptq_qlinear()
    inn, out, gs = 128, 64, 32
    ours = make_layer(inn, out, gs, seed=7)
    if act_order:
        g_idx = ours.g_idx[torch.randperm(inn, generator=torch.Generator().manual_seed(1))]
        ours = QuantLinear.from_codes(
            packing.unpack_rows(ours.qweight).t(),
            ours.scales,
            packing.decode_zeros(ours.qzeros, 1),
            g_idx,
            ours.bias,
            gs,
        )
    linear = nn.Linear(inn, out).half()
    with torch.no_grad():
        linear.weight.copy_(ours.dequantize(torch.float16))
        linear.bias.copy_(ours.bias.half())
    theirs = AutoQuantLinear(4, gs, inn, out, True)
    zeros = packing.decode_zeros(ours.qzeros, 1)  # (G, out)
    theirs.pack(linear, ours.scales.t().float(), zeros.t().contiguous(), g_idx=ours.g_idx.clone())
    assert torch.equal(theirs.qweight, ours.qweight)
    assert torch.equal(theirs.qzeros, ours.qzeros)
    assert torch.equal(theirs.scales, ours.scales)
    assert torch.equal(theirs.g_idx.int(), ours.g_idx)
    x = torch.randn(4, inn).half()
    torch.testing.assert_close(theirs(x).float(), ours.half()(x).float(), rtol=2e-3, atol=2e-3)
