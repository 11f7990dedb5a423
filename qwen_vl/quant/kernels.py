"""Which int4 matmul a ``QuantLinear`` runs, and the conversion to the fast layout.

Two kernels:

* ``"reference"``: unpack the codes and dequantise the whole weight in the
  activation dtype on every forward, then one dense matmul. Exact (the weight is
  computed in float32 and rounded once), autograd-friendly, any device, any
  ``g_idx``; memory stays at 4 bits per weight between forwards, and nothing is
  cached, so the cost of unpacking is paid per call.
* ``"tinygemm"``: PyTorch's built-in int4 weight-only kernel
  (``aten._weight_int4pack_mm``, the one torchao's int4 weight-only layout calls),
  fed from our tensors once at load. It computes ``W = (q - 8) * s + o`` per group,
  so a GPTQ group ``s * (q - z)`` becomes scale ``s`` and offset ``o = s * (8 - z)``.
  Act-order layers are handled by sorting the inputs by group once (``perm``) and
  gathering the activations the same way per call. On CUDA it needs compute
  capability 8.0+, bfloat16 scales and activations (float16 activations are cast),
  a group size of 32, 64, 128 or 256 with every group full, an input size
  divisible by 32 and an output size divisible by 16. On CPU the same arithmetic
  runs through the CPU variant of the op (``_weight_int4pack_mm_for_cpu``, float32
  allowed), which is how the conversion is tested without a GPU.

``select_kernel`` is the one place the choice is made; ``QuantLinear.use_kernel``
applies it at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .packing import MAX_CODE, decode_zeros, unpack_rows

KERNELS = ("auto", "reference", "tinygemm")
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
_MIDPOINT = (MAX_CODE + 1) // 2  # tinygemm's implicit zero point: 8


class QuantizedLayer(Protocol):
    in_features: int
    out_features: int
    group_size: int
    zero_offset: int
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def inner_k_tiles(in_features: int) -> int | None:
    """The tile count tinygemm packs with (8, 4 or 2 tiles of 16 inputs), or None if none divides."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


def group_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The input order that makes groups contiguous and full (None if it is already
    the identity); raises ``ValueError`` if some group is not exactly ``group_size`` long."""
    counts = torch.bincount(g_idx.long().cpu())
    if not bool((counts == group_size).all()):
        raise ValueError("groups of unequal size")
    order = torch.argsort(g_idx.long().cpu(), stable=True)
    if torch.equal(order, torch.arange(g_idx.numel())):
        return None
    return order


def tinygemm_problem(layer: QuantizedLayer, device: torch.device) -> str | None:
    """Why the tinygemm kernel cannot run ``layer`` on ``device``, or None if it can."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the GPU's compute capability is below 8.0"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return "this PyTorch has no _weight_int4pack_mm"
    elif device.type == "cpu":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this PyTorch has no _weight_int4pack_mm_for_cpu"
    else:
        return f"no int4 kernel for device type {device.type}"
    if layer.group_size not in TINYGEMM_GROUP_SIZES:
        return f"group size {layer.group_size} is not one of {TINYGEMM_GROUP_SIZES}"
    if layer.in_features % layer.group_size:
        return f"in_features {layer.in_features} is not a multiple of the group size {layer.group_size}"
    if inner_k_tiles(layer.in_features) is None:
        return f"in_features {layer.in_features} is not a multiple of 32"
    if layer.out_features % 16:  # CUDA tiles 8 outputs, ROCm and the CPU variant 16
        return f"out_features {layer.out_features} is not a multiple of 16"
    try:
        group_order(layer.g_idx, layer.group_size)
    except ValueError:
        return "g_idx has groups of unequal size"
    return None


def select_kernel(
    layer: QuantizedLayer, device: torch.device | str, dtype: torch.dtype, requested: str = "auto"
) -> str:
    """The kernel ``layer`` runs with activations of ``dtype`` on ``device``.

    ``"auto"``: tinygemm on a CUDA GPU that can run it with bfloat16 or float16
    activations, the reference path everywhere else (CPU included: exact, and the
    layer may be trained through). ``"reference"`` always works; ``"tinygemm"``
    raises ``ValueError`` saying why when it cannot run.
    """
    if requested not in KERNELS:
        raise ValueError(f"unknown int4 kernel {requested!r}: use one of {', '.join(KERNELS)}")
    device = torch.device(device)
    if requested == "reference" or (requested == "auto" and device.type != "cuda"):
        return "reference"
    problem = tinygemm_problem(layer, device)
    if requested == "tinygemm":
        if problem is not None:
            raise ValueError(f"the tinygemm int4 kernel cannot run this layer on {device}: {problem}")
        return "tinygemm"
    return "tinygemm" if problem is None and dtype in (torch.bfloat16, torch.float16) else "reference"


@dataclass
class TinyGemmWeights:
    """A layer in tinygemm's layout on one device."""

    packed: torch.Tensor  # device-specific int4 tiles
    scales_and_zeros: torch.Tensor  # (G, out, 2): scale, offset
    perm: torch.Tensor | None  # (in,) input order that makes groups contiguous, or None
    group_size: int
    device: torch.device


def pair_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) → uint8 (out, in / 2), input 2j in the high nibble and 2j+1 in the
    low one: the input layout of the CUDA ``_convert_weight_to_int4pack``."""
    c = codes.to(torch.int32)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).to(torch.uint8)


def tinygemm_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """GPTQ scales and zero points (G, out) → tinygemm's (G, out, 2) [scale, offset] in ``dtype``,
    with ``offset = scale * (8 - zero)`` computed in float32."""
    s = scales.to(torch.float32)
    offset = s * (_MIDPOINT - zeros.to(torch.float32))
    return torch.stack([s, offset], dim=-1).to(dtype).contiguous()


def to_tinygemm(layer: QuantizedLayer, device: torch.device | str, dtype: torch.dtype) -> TinyGemmWeights:
    """Convert ``layer``'s tensors to tinygemm's layout on ``device`` (``dtype``: of the
    scales and offsets, bfloat16 on CUDA)."""
    device = torch.device(device)
    codes = unpack_rows(layer.qweight.cpu()).t().contiguous()  # (out, in)
    perm = group_order(layer.g_idx, layer.group_size)
    if perm is not None:
        codes = codes[:, perm].contiguous()
    zeros = decode_zeros(layer.qzeros.cpu(), layer.zero_offset)  # (G, out)
    sz = tinygemm_scales_and_zeros(layer.scales.cpu(), zeros, dtype).to(device)
    tiles = inner_k_tiles(layer.in_features)
    if device.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(pair_nibbles(codes).to(device), tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), tiles)
    return TinyGemmWeights(
        packed=packed,
        scales_and_zeros=sz,
        perm=perm.to(device) if perm is not None else None,
        group_size=layer.group_size,
        device=device,
    )


def tinygemm_matmul(x: torch.Tensor, weights: TinyGemmWeights) -> torch.Tensor:
    """``x`` (M, in) times the layer's weight → (M, out) in the kernel's dtype."""
    if weights.perm is not None:
        x = x.index_select(1, weights.perm)
    x = x.to(weights.scales_and_zeros.dtype).contiguous()
    if weights.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, weights.packed, weights.group_size, weights.scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weights.packed, weights.group_size, weights.scales_and_zeros)
