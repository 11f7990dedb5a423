"""GPTQ on single matrices: it beats round-to-nearest on the layer's reconstruction error,
act-order groups, short last groups, dead inputs, scale rounding, and its errors."""

from __future__ import annotations

import pytest
import torch

from qwen_vl.quant.gptq import (
    GPTQError,
    HessianAccumulator,
    fit_group,
    gptq_quantize,
    reconstruction_error,
    rtn_quantize,
)
from qwen_vl.quant.linear import QuantLinear


def layer_problem(out: int = 96, inn: int = 256, rows: int = 2048, seed: int = 0):
    """A weight (out, in) and the Hessian of correlated inputs whose features differ in scale
    (as activations do), plus the inputs themselves."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inn, inn, generator=gen) / inn**0.5
    feature_scale = torch.exp(torch.randn(inn, generator=gen))  # a few features are much larger
    x = (torch.randn(rows, inn, generator=gen) @ mixing + 0.3 * torch.randn(rows, inn, generator=gen)) * feature_scale
    w = torch.randn(out, inn, generator=gen) * 0.05
    acc = HessianAccumulator(inn)
    for chunk in x.split(500):
        acc.add(chunk[None])  # (1, N, in): any leading shape
    return w, acc.hessian(), x


def test_hessian_is_two_x_transpose_x_over_the_rows() -> None:
    _, h, x = layer_problem(rows=1000)
    torch.testing.assert_close(h, 2 * x.t() @ x / 1000, rtol=1e-4, atol=1e-3)
    with pytest.raises(GPTQError, match="no calibration inputs"):
        HessianAccumulator(4).hessian()


# Measured on this problem (96 x 256, 2048 rows), error tr((W-Q) H (W-Q)^T), RTN -> GPTQ:
#   group 128: 9.53 -> 6.03 (0.63x), act-order 3.54 (0.37x)
#   group  32: 6.88 -> 4.60 (0.67x), act-order 2.55 (0.37x)
#   one group: 10.70 -> 6.88 (0.64x), act-order 4.09 (0.38x)
@pytest.mark.parametrize("group_size", [128, 32, -1])
def test_gptq_beats_round_to_nearest(group_size: int) -> None:
    w, h, x = layer_problem()
    e_rtn = reconstruction_error(w, rtn_quantize(w, group_size=group_size).dequantize(), h)
    gptq = gptq_quantize(w, h, group_size=group_size)
    e_gptq = reconstruction_error(w, gptq.dequantize(), h)
    e_act = reconstruction_error(w, gptq_quantize(w, h, group_size=group_size, act_order=True).dequantize(), h)
    assert e_gptq < 0.75 * e_rtn and e_act < 0.45 * e_rtn, (e_rtn, e_gptq, e_act)
    # the direct output error on the inputs agrees with the Hessian form
    direct = ((x @ (w - gptq.dequantize()).t()) ** 2).sum() * 2 / x.shape[0]
    assert float(direct) == pytest.approx(e_gptq, rel=1e-3)


def test_act_order_groups_follow_the_hessian_and_pack() -> None:
    w, h, _ = layer_problem(inn=128)
    result = gptq_quantize(w, h, group_size=32, act_order=True)
    order = torch.argsort(h.diagonal(), descending=True)
    expected = torch.empty(128, dtype=torch.int32)
    expected[order] = torch.arange(128, dtype=torch.int32) // 32  # the largest inputs come first
    assert torch.equal(result.g_idx, expected)
    assert result.scales.shape == (4, 96) and result.scales.dtype == torch.float16
    layer = QuantLinear.from_codes(result.codes, result.scales, result.zeros, result.g_idx, None, 32)
    torch.testing.assert_close(layer.dequantize(), result.dequantize(), rtol=0, atol=0)


def test_short_last_group_and_dead_inputs() -> None:
    w, h, _ = layer_problem(inn=344)
    h[5, :] = 0
    h[:, 5] = 0  # an input never seen: its weights are dropped
    result = gptq_quantize(w, h, group_size=128)
    assert result.scales.shape == (3, 96)  # 128 + 128 + 88
    assert torch.equal(torch.bincount(result.g_idx.long()), torch.tensor([128, 128, 88]))
    assert bool((result.dequantize()[:, 5] == 0).all())
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= 15


def test_group_fit() -> None:
    w = torch.tensor([[-1.0, 0.5, 0.25], [0.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    scale, zero = fit_group(w, sym=True)
    assert scale.tolist() == pytest.approx([2 / 15, 2 / 15, 1.2 / 15], rel=1e-3)
    assert torch.equal(scale, scale.half().float())  # exactly the float16 value the file stores
    assert zero.tolist() == [8, 8, 8]
    scale, zero = fit_group(w, sym=False)
    assert zero.tolist() == [10, 8, 1]  # all-positive row: zero point 0 raised to 1 (the "gptq" format's least)
    with pytest.raises(GPTQError, match="Hessian .* does not match"):
        gptq_quantize(w, torch.eye(2), group_size=-1)
    bad = torch.eye(3)
    bad[0, 0] = float("nan")
    with pytest.raises(GPTQError, match="not positive definite .* use more calibration samples or a larger --damp"):
        gptq_quantize(w, bad, group_size=-1)
