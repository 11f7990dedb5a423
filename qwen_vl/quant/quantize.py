"""``quantize_checkpoint``: a float Qwen-VL checkpoint → an Int4 GPTQ checkpoint in the
official layout (the function behind ``qwen-vl quantize``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from ..config import QWenConfig
from ..finetune.merge import parse_size
from ..modeling import QWenLMHeadModel, resolve_dtype
from ..tokenizer import QWenTokenizer
from .blocks import BLOCKS, GPTQSettings, LayerReport, quantize_decoder
from .calibration import calibration_file, load_calibration
from .config import GPTQConfig, read_gptq_config
from .loading import select_kernels
from .packing import PER_WORD
from .progress import LayerProgress
from .writer import write_quantized

METHODS = ("gptq",)
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class QuantizeResult:
    """What ``quantize_checkpoint`` did; ``model`` is the quantized model as written (on CPU)."""

    out_dir: Path
    weight_files: list[Path]
    config: GPTQConfig
    samples: int
    tokens: int
    reports: dict[str, LayerReport]
    model: QWenLMHeadModel = field(repr=False)

    def __str__(self) -> str:
        c = self.config
        return (
            f"quantized {len(self.reports)} linear layers to 4-bit GPTQ (group size {c.group_size}, "
            f"{'symmetric' if c.sym else 'asymmetric'}, act-order {'on' if c.desc_act else 'off'}) on "
            f"{self.samples} calibration samples ({self.tokens:,} tokens); wrote {len(self.weight_files)} "
            f"weight file(s) to {self.out_dir}"
        )


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    prefix = BLOCKS + "."
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and type(m) is nn.Linear}


def _check_shapes(linears: dict[str, nn.Linear]) -> None:
    for name, layer in linears.items():
        for what, size in (("in", layer.in_features), ("out", layer.out_features)):
            if size % PER_WORD:
                raise ValueError(
                    f"{name}: {what}_features {size} is not a multiple of {PER_WORD}, so its 4-bit codes cannot be "
                    "packed into int32 words"
                )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available to this process")
    return device


def check_request(
    model_dir: Path,
    out_dir: Path,
    calib: str | Path,
    *,
    method: str,
    bits: int,
    group_size: int,
    damp: float,
    overwrite: bool,
) -> None:
    """Check the arguments before anything is loaded; raises ``ValueError``,
    ``FileNotFoundError`` or ``FileExistsError`` naming the problem."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not supported: use gptq")
    if bits != 4:
        raise ValueError(f"--bits {bits} is not supported: qwen-vl writes 4-bit GPTQ only (--bits 4)")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"--group-size must be a positive number of input columns or -1, got {group_size}")
    if not 0 < damp < 1:
        raise ValueError(f"--damp must be in (0, 1), got {damp}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a checkpoint directory)")
    if read_gptq_config(model_dir) is not None:
        raise ValueError(f"{model_dir} is already an Int4 GPTQ checkpoint: quantize its float original")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"the output directory {out_dir} is the model directory: choose a new one")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (choose another directory or pass --overwrite)")
    calibration_file(calib)


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    calib: str | Path,
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    calib_samples: int = 128,
    max_length: int = 2048,
    image_root: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    seed: int = 0,
    stream: TextIO | None = None,
    quiet: bool = False,
) -> QuantizeResult:
    """Quantize the decoder's linear layers of ``model_dir`` with GPTQ on calibration
    conversations from ``calib`` and write the Int4 checkpoint to ``out_dir``.

    ``dtype`` ("auto" = the checkpoint's ``torch_dtype``) is the dtype the model loads
    in and the float tensors are written in (scales are always float16); each block is
    calibrated in float32 on ``device`` ("auto": CUDA when present). The input size of a
    layer need not be a multiple of ``group_size``: the last group is shorter, as in
    AutoGPTQ's layout. Progress goes to ``stream`` (stderr), one line per layer.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_request(
        model_dir, out_dir, calib, method=method, bits=bits, group_size=group_size, damp=damp, overwrite=overwrite
    )
    gptq = GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=act_order, damp_percent=damp)
    max_bytes = parse_size(max_shard_size)
    work = _device(device)
    config = QWenConfig.from_pretrained(model_dir)
    load_dtype = resolve_dtype(dtype, config)
    tokenizer = QWenTokenizer.from_pretrained(model_dir)
    samples = load_calibration(
        calib,
        tokenizer,
        int(config.visual["image_size"]),
        samples=calib_samples,
        max_length=max_length,
        image_root=image_root,
        seed=seed,
    )
    model = QWenLMHeadModel.from_pretrained(model_dir, dtype=load_dtype, device="cpu")
    linears = _decoder_linears(model)
    _check_shapes(linears)

    progress = LayerProgress(len(linears), stream=stream, quiet=quiet)
    settings = GPTQSettings(group_size=group_size, sym=sym, act_order=act_order, damp=damp)
    outside = (model.transformer.wte, model.transformer.visual)
    for module in outside:
        module.to(work)
    try:
        reports = quantize_decoder(
            model, samples, settings, work, gptq.zero_offset, on_layer=lambda r: progress.update(r.name, r.error)
        )
    finally:
        for module in outside:
            module.to("cpu")
        progress.close()
    model.config.dtype = load_dtype
    written = write_quantized(model, model_dir, out_dir, gptq, max_shard_bytes=max_bytes, overwrite=overwrite)
    select_kernels(model, load_dtype)
    return QuantizeResult(
        out_dir=out_dir,
        weight_files=written,
        config=gptq,
        samples=len(samples),
        tokens=sum(s.num_tokens for s in samples),
        reports=reports,
        model=model,
    )
