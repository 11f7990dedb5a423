"""GPTQ on one weight matrix, and round-to-nearest for comparison.

GPTQ (Frantar et al., 2022) quantizes the columns (inputs) of ``W`` (out, in) one
at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian of the layer's reconstruction loss
``||X W^T - X Q^T||^2``, ``H = 2 X^T X`` over the calibration activations ``X``.
Steps:

1. inputs never seen (zero Hessian diagonal) get weight 0 and a unit diagonal;
2. with act-order, columns are visited by decreasing Hessian diagonal;
3. ``H += damp * mean(diag H) * I`` (retried with 10x the damping while it is not
   positive definite), then ``U`` = the upper Cholesky factor of ``H^-1``;
4. columns are processed in blocks; inside a block, column ``i`` is rounded, its
   error ``e = (w_i - q_i) / U[i, i]`` updates the block's later columns with
   ``U[i, i:]``, and after the block the accumulated errors update all later
   columns at once;
5. at the first column of each group of ``group_size`` columns (in visiting
   order) the group's scale and zero point are fitted to its current, already
   error-corrected weights. Blocks are a multiple of the group size, so every
   group starts inside a block whose updates it has fully received.

Scales are rounded to float16 when fitted, so the codes are exactly those the
stored float16 scales reproduce. Zero points: symmetric groups use 8 (values
``-8s .. 7s`` around 0); asymmetric ones ``round(-min / s)``, kept within
``min_zero .. 15 + min_zero`` so the "gptq" file format (which stores zero - 1)
can hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import MAX_CODE

_FP16 = torch.finfo(torch.float16)


class GPTQError(ValueError):
    """GPTQ could not run on a layer (for example a Hessian that stays singular)."""


@dataclass
class QuantizedWeight:
    """The result of quantizing one matrix: what the checkpoint stores, and the weight it means."""

    codes: torch.Tensor  # (out, in) int32 in 0..15, inputs in their original order
    scales: torch.Tensor  # (G, out) float16
    zeros: torch.Tensor  # (G, out) int32
    g_idx: torch.Tensor  # (in,) int32: the group of each input
    group_size: int
    loss: float  # GPTQ's running estimate of the added reconstruction loss

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same result with its tensors on ``device``."""
        return QuantizedWeight(
            self.codes.to(device),
            self.scales.to(device),
            self.zeros.to(device),
            self.g_idx.to(device),
            self.group_size,
            self.loss,
        )

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) in float32: ``scale * (code - zero)`` per group."""
        groups = self.g_idx.long()
        return (self.codes - self.zeros[groups].t()).float() * self.scales[groups].t().float()


class HessianAccumulator:
    """``H = 2 / N * sum(x x^T)`` over the N input rows a layer saw (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` (..., in)."""
        x2 = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)  # (N, in)
        self.sum.addmm_(x2.t(), x2)
        self.rows += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise GPTQError("no calibration inputs reached this layer")
        return self.sum * (2.0 / self.rows)


def fit_group(
    w: torch.Tensor, sym: bool = True, min_zero: int = 1, max_code: int = MAX_CODE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32 holding a float16 value) and zero point (float32 integer) per row of
    ``w`` (out, n), the range always including 0."""
    w = w.float()
    lo = torch.clamp(w.min(dim=1).values, max=0.0)
    hi = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = hi == lo
    lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
    hi = torch.where(flat, torch.full_like(hi, 1.0), hi)
    scale = ((hi - lo) / max_code).clamp(min=_FP16.tiny, max=_FP16.max).to(torch.float16).float()
    if sym:
        zero = torch.full_like(scale, float((max_code + 1) // 2))
    else:
        zero = torch.round(-lo / scale).clamp(min_zero, max_code + min_zero)
    return scale, zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int = MAX_CODE) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code)


def _upper_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    mean_diag = float(h.diagonal().mean())
    for attempt in range(4):
        damped = h.clone()
        damped.diagonal().add_(damp * (10**attempt) * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                return upper
    raise GPTQError(
        f"the Hessian is not positive definite even with damping {damp * 1000:g}x its mean diagonal / 1000: "
        "use more calibration samples or a larger --damp"
    )


def _block_size(group_size: int, preferred: int = 128) -> int:
    return group_size * max(1, preferred // group_size)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    min_zero: int = 1,
) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) to 4 bits with GPTQ, given the Hessian (in, in) of its inputs.

    ``group_size`` -1 means one group of all inputs. The input dimension need not be a
    multiple of the group size (the last group is shorter, as in AutoGPTQ's layout).
    """
    out_features, n = weight.shape
    if hessian.shape != (n, n):
        raise GPTQError(f"Hessian {tuple(hessian.shape)} does not match a weight with {n} inputs")
    g = n if group_size == -1 else group_size
    W = weight.detach().float().clone()  # (out, in)
    H = hessian.detach().float().clone().to(W.device)  # (in, in)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    U = _upper_inverse_cholesky(H, damp)  # (in, in) upper triangular

    codes = torch.zeros(out_features, n, dtype=torch.int32, device=W.device)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    block = _block_size(g)
    scale = zero = None
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        W1 = W[:, b0:b1].clone()  # (out, b)
        errors = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            if (b0 + i) % g == 0:
                scale, zero = fit_group(W1[:, i : i + g], sym, min_zero)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            q = _round(w, scale, zero)
            dq = scale * (q - zero)
            codes[:, b0 + i] = q.to(torch.int32)
            d = U1[i, i]
            err = (w - dq) / d
            loss += (err.double() ** 2).sum() / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            errors[:, i] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]

    inverse = torch.argsort(perm)
    g_idx = torch.div(torch.arange(n, device=W.device), g, rounding_mode="floor")[inverse].to(torch.int32)
    return QuantizedWeight(
        codes=codes[:, inverse].contiguous(),
        scales=torch.stack(scales).to(torch.float16),  # (G, out)
        zeros=torch.stack(zeros).to(torch.int32),  # (G, out)
        g_idx=g_idx,
        group_size=g,
        loss=float(loss),
    )


def rtn_quantize(
    weight: torch.Tensor, *, group_size: int = 128, sym: bool = True, min_zero: int = 1
) -> QuantizedWeight:
    """Round-to-nearest 4-bit quantization of ``weight`` (out, in) with the same groups,
    scales and zero points as ``gptq_quantize`` but no error feedback."""
    out_features, n = weight.shape
    g = n if group_size == -1 else group_size
    W = weight.detach().float()
    codes = torch.zeros(out_features, n, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    for c0 in range(0, n, g):
        scale, zero = fit_group(W[:, c0 : c0 + g], sym, min_zero)
        codes[:, c0 : c0 + g] = _round(W[:, c0 : c0 + g], scale[:, None], zero[:, None]).to(torch.int32)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=codes,
        scales=torch.stack(scales).to(torch.float16),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=torch.div(torch.arange(n, device=W.device), g, rounding_mode="floor").to(torch.int32),
        group_size=g,
        loss=float("nan"),
    )


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer's output error summed over outputs, averaged
    over the calibration rows (H = 2/N X^T X, so this is 2/N ||X W^T - X Q^T||^2)."""
    d = (weight.float() - quantized.float()).to(hessian.device)  # (out, in)
    return float(((d @ hessian.float()) * d).sum().detach())
