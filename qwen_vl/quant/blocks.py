"""GPTQ through the decoder blocks, one block at a time.

The calibration samples run through the model once, up to the first decoder
block, and the block's inputs are kept. Then for each block: forward hooks on its
linear layers accumulate their Hessians while the block runs on every sample;
GPTQ quantizes them and their weights are replaced by the quantized values; the
block runs again to give the next block its inputs. So every block is calibrated
on what the already-quantized blocks before it produce. With ``true_sequential``
(AutoGPTQ's default) the layers of a block go in four steps, each step seeing
the quantized layers of the earlier ones: ``attn.c_attn``; ``attn.c_proj``;
``mlp.w1`` and ``mlp.w2``; ``mlp.c_proj``.

A block is moved to the work device and float32 while it is calibrated, then
back, and its linear layers become ``QuantLinear`` layers; the rest of the model
stays where it was loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model.attention_inputs import AttentionInputs
from .calibration import CalibrationSample
from .gptq import HessianAccumulator, QuantizedWeight, gptq_quantize, reconstruction_error
from .writer import install_results

#: The linear layers of a decoder block, in AutoGPTQ's sequential steps for Qwen.
SEQUENTIAL_STEPS: tuple[tuple[str, ...], ...] = (
    ("attn.c_attn",),
    ("attn.c_proj",),
    ("mlp.w1", "mlp.w2"),
    ("mlp.c_proj",),
)
BLOCKS = "transformer.h"


@dataclass(frozen=True)
class GPTQSettings:
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp: float = 0.01
    true_sequential: bool = True


@dataclass(frozen=True)
class LayerReport:
    """One quantized layer: its name and its calibration error against the float weights."""

    name: str
    error: float  # tr((W - Q) H (W - Q)^T), H from the layer's own calibration inputs
    group_size: int


class _Captured(Exception):
    """Stops the forward pass once the first block's inputs are recorded."""


def _inputs_to(inputs: AttentionInputs, device: torch.device) -> AttentionInputs:
    return AttentionInputs(
        cos=inputs.cos.to(device),
        sin=inputs.sin.to(device),
        logn=inputs.logn.to(device) if inputs.logn is not None else None,
        mask=inputs.mask.to(device) if inputs.mask is not None else None,
        is_causal=inputs.is_causal,
        kv_cache=None,
    )


def capture_block_inputs(
    model: nn.Module, samples: Sequence[CalibrationSample], device: torch.device
) -> list[tuple[torch.Tensor, AttentionInputs]]:
    """Each sample's input to the first decoder block: hidden states (1, T, C) in float32
    on ``device`` and its attention inputs."""
    blocks = model.transformer.h
    captured: list[tuple[torch.Tensor, AttentionInputs]] = []

    def record(_module: nn.Module, args: tuple) -> None:
        h, inputs = args
        captured.append((h.detach().to(device, torch.float32), _inputs_to(inputs, device)))
        raise _Captured

    model_device = model.transformer.wte.weight.device
    handle = blocks[0].register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for sample in samples:
                images = [p.to(model_device) for p in sample.images] if sample.images else None
                try:
                    model(input_ids=sample.input_ids.to(model_device), images=images, compute_logits=False)
                except _Captured:
                    continue
                raise RuntimeError("the forward pass never reached the first decoder block")
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, cache: Sequence[tuple[torch.Tensor, AttentionInputs]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [block(h, inputs) for h, inputs in cache]


def quantize_block(
    block: nn.Module,
    prefix: str,
    cache: Sequence[tuple[torch.Tensor, AttentionInputs]],
    settings: GPTQSettings,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> dict[str, tuple[LayerReport, QuantizedWeight]]:
    """GPTQ every linear layer of ``block`` (float32, on the cache's device) in place:
    their weights become the quantized values. Returns each layer's report and result
    (codes on CPU), by its name inside the block."""
    steps = SEQUENTIAL_STEPS if settings.true_sequential else (tuple(n for s in SEQUENTIAL_STEPS for n in s),)
    results: dict[str, tuple[LayerReport, QuantizedWeight]] = {}
    for names in steps:
        layers = {name: block.get_submodule(name) for name in names}
        device = next(iter(layers.values())).weight.device
        hessians = {name: HessianAccumulator(layer.in_features, device) for name, layer in layers.items()}
        handles = [
            layer.register_forward_hook(lambda _m, args, _out, acc=hessians[name]: acc.add(args[0]))
            for name, layer in layers.items()
        ]
        try:
            _run_block(block, cache)
        finally:
            for handle in handles:
                handle.remove()
        for name, layer in layers.items():
            H = hessians[name].hessian()
            result = gptq_quantize(
                layer.weight,
                H,
                group_size=settings.group_size,
                sym=settings.sym,
                act_order=settings.act_order,
                damp=settings.damp,
            )
            quantized = result.dequantize()
            report = LayerReport(
                f"{prefix}.{name}", reconstruction_error(layer.weight, quantized, H), result.group_size
            )
            with torch.no_grad():
                layer.weight.copy_(quantized.to(layer.weight.dtype))
            results[name] = (report, result.to("cpu"))
            if on_layer is not None:
                on_layer(report)
            del hessians[name]
    return results


def quantize_decoder(
    model: nn.Module,
    samples: Sequence[CalibrationSample],
    settings: GPTQSettings,
    device: torch.device,
    zero_offset: int = 1,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> dict[str, LayerReport]:
    """GPTQ every linear layer of every decoder block of ``model``, block by block. Once a
    block has given the next one its inputs, its linear layers are replaced by
    ``QuantLinear`` layers (``zero_offset``: of the checkpoint format), so only one block's
    codes are ever held unpacked. Returns the reports by full layer name."""
    cache = capture_block_inputs(model, samples, device)
    reports: dict[str, LayerReport] = {}
    for i, block in enumerate(model.transformer.h):
        home = next(block.parameters())
        home_device, home_dtype = home.device, home.dtype
        block.to(device=device, dtype=torch.float32)
        results = quantize_block(block, f"{BLOCKS}.{i}", cache, settings, on_layer)
        outputs = _run_block(block, cache)
        cache = [(out, inputs) for out, (_, inputs) in zip(outputs, cache)]
        block.to(device=home_device, dtype=home_dtype)
        install_results(block, {name: result for name, (_, result) in results.items()}, zero_offset)
        reports.update({report.name: report for report, _ in results.values()})
    return reports
