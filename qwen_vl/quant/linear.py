"""``QuantLinear``: a 4-bit GPTQ linear layer holding the checkpoint's tensors as they are.

Its buffers are the AutoGPTQ names and shapes (see ``packing``), so ``state_dict``
keys and tensors equal the official Int4 files'. It has no parameters: the layer is
frozen (LoRA adapters go on top of it, see ``finetune.lora``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .kernels import TinyGemmWeights, select_kernel, tinygemm_matmul, to_tinygemm
from .packing import PER_WORD, default_g_idx, dequantize, dequantize_transposed, encode_zeros, pack_rows


class QuantLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored as GPTQ int4 codes, scales and zero points.

    ``zero_offset`` is 1 for the "gptq" checkpoint format (zero points stored minus
    one) and 0 for "gptq_v2". ``scales`` keep the dtype they were loaded with
    (float16 in AutoGPTQ files), also through ``model.to(dtype)``; ``bias`` follows
    the model's dtype like any float tensor.
    """

    #: Buffers the loader stores in the checkpoint's dtype instead of the compute dtype.
    keeps_checkpoint_dtype = ("scales",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int = 128,
        zero_offset: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        g_idx_in_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        group_size = in_features if group_size == -1 else group_size
        if in_features % PER_WORD or out_features % PER_WORD:
            raise ValueError(
                f"a 4-bit GPTQ layer needs in and out features divisible by {PER_WORD}, "
                f"got {in_features} x {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.zero_offset = zero_offset
        groups = math.ceil(in_features / group_size)
        self.register_buffer(
            "qweight", torch.zeros(in_features // PER_WORD, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer("qzeros", torch.zeros(groups, out_features // PER_WORD, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        # a checkpoint without g_idx (older AutoGPTQ files) means the plain grouping; it is then not saved either
        g_idx = default_g_idx(in_features, group_size, device="cpu" if device == "meta" else device)
        self.register_buffer("g_idx", g_idx, persistent=g_idx_in_checkpoint)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None
        self.kernel = "reference"
        self._tinygemm: TinyGemmWeights | None = None

    # peft (and AutoGPTQ code) read these names
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        zero_offset: int = 1,
    ) -> QuantLinear:
        """A layer from integer codes (out, in) in 0..15, scales (G, out), zero points (G, out)
        and ``g_idx`` (in,), packed into the checkpoint layout."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bias is not None, group_size, zero_offset, device="cpu")
        layer.qweight = pack_rows(codes.t().contiguous().cpu())
        layer.qzeros = encode_zeros(zeros.cpu(), zero_offset)
        layer.scales = scales.to(torch.float16).cpu().contiguous()
        layer.g_idx = g_idx.to(torch.int32).cpu().contiguous()
        if bias is not None:
            layer.bias = bias.detach().cpu().clone()
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) this layer multiplies by."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.zero_offset, dtype)

    # ----- kernels ---------------------------------------------------------
    def use_kernel(self, requested: str = "auto", dtype: torch.dtype | None = None) -> str:
        """Choose (``kernels.select_kernel``) and prepare the int4 kernel for this
        layer's device and activation ``dtype``; returns the kernel's name."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        device = self.qweight.device
        self.kernel = select_kernel(self, device, dtype, requested)
        self._tinygemm = None
        if self.kernel == "tinygemm":
            sz_dtype = torch.bfloat16 if device.type == "cuda" else dtype
            self._tinygemm = to_tinygemm(self, device, sz_dtype)
        return self.kernel

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        scales = self._buffers.pop("scales")
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(scales)
            if moved.dtype != scales.dtype:  # a dtype change never reaches the scales: move them only
                moved = scales.to(device=moved.device)
            self._buffers["scales"] = moved
        if self._tinygemm is not None and self._tinygemm.device != self.qweight.device:
            self._tinygemm = None  # prepared for another device: rebuilt on the next forward
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        trains_through = torch.is_grad_enabled() and x.requires_grad
        if self.kernel == "tinygemm" and not trains_through:
            if self._tinygemm is None:
                self.use_kernel("tinygemm", x.dtype)
            y = tinygemm_matmul(x2, self._tinygemm).to(x.dtype)  # (M, out)
        else:
            w_t = dequantize_transposed(self.qweight, self.qzeros, self.scales, self.g_idx, self.zero_offset, x.dtype)
            y = x2 @ w_t  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits=4, group_size={self.group_size}, kernel={self.kernel}"
        )
