"""LoRA adapters on ``QWenLMHeadModel`` through peft: settings, wrapping, saving
and loading adapters in peft's format.

Adapters target linear layers of the decoder blocks ``transformer.h.<i>`` only;
the vision tower also has modules called ``c_proj`` and ``c_fc``, which are never
targeted. Parts that train in full (embeddings for the base model, the resampler,
the whole ViT without ``fix_vit``) are peft ``modules_to_save`` and are stored in
the adapter. The wrapped model is a plain ``peft.PeftModel`` (no task type), whose
``forward`` passes every argument (``images`` included) to our model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn

from ..quant.config import QUANTIZE_CONFIG
from ..quant.linear import QuantLinear
from .trainable import EMBEDDINGS, freeze_fixed_parameters, vision_modules_to_save

#: The official script's LoRA targets plus the MLP output projection.
DEFAULT_TARGETS = ("c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj")
#: Prefix of the decoder blocks; LoRA targets are looked up below it only.
LLM_BLOCKS = "transformer.h"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_TARGET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
#: Layers LoRA adapters can wrap: float linear layers and Int4 GPTQ ones.
LINEAR_TYPES = (nn.Linear, QuantLinear)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank, scale (``alpha / r``), dropout and target modules.

    ``targets`` are module names or dotted suffixes inside a decoder block
    (``"c_proj"`` selects both ``attn.c_proj`` and ``mlp.c_proj``); a comma-separated
    string is accepted too.
    """

    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):
            targets = targets.split(",")
        targets = tuple(t.strip() for t in targets)
        object.__setattr__(self, "targets", targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not targets:
            raise ValueError("LoRA targets are empty: name at least one module of the decoder blocks")
        bad = [t for t in targets if not _TARGET_NAME.fullmatch(t)]
        if bad:
            raise ValueError(f"LoRA targets must be module names or dotted suffixes like 'attn.c_proj', got {bad}")


def target_pattern(targets: Iterable[str]) -> str:
    """Regular expression (peft ``target_modules``) for the full module names that
    end with one of ``targets`` inside ``transformer.h.<i>``."""
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf"{re.escape(LLM_BLOCKS)}\.\d+\.(?:.+\.)?(?:{alternatives})"


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The names of the modules ``targets`` select; every target must select at
    least one module and only linear layers (float or Int4 GPTQ)."""
    modules = dict(model.named_modules())
    if not any(name.startswith(LLM_BLOCKS + ".") for name in modules):
        raise ValueError(f"{type(model).__name__} has no decoder blocks under {LLM_BLOCKS}.<i>")
    selected: list[str] = []
    for target in targets:
        pattern = re.compile(target_pattern([target]))
        hits = [name for name in modules if pattern.fullmatch(name)]
        if not hits:
            block = modules[f"{LLM_BLOCKS}.0"]
            known = ", ".join(n for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES))
            raise ValueError(
                f"LoRA target {target!r} matches no module of {LLM_BLOCKS}.<i> (its linear layers: {known})"
            )
        not_linear = [f"{n} ({type(modules[n]).__name__})" for n in hits if not isinstance(modules[n], LINEAR_TYPES)]
        if not_linear:
            raise ValueError(
                f"LoRA target {target!r} selects modules that are not linear layers: {', '.join(not_linear)}"
            )
        selected.extend(h for h in hits if h not in selected)
    return selected


def _declare_tied_embeddings(model: nn.Module) -> None:
    """Let peft see that ``lm_head`` shares the weight of ``transformer.wte``, so
    that it trains one shared copy (peft reads ``_tied_weights_keys``)."""
    if getattr(model, "_tied_weights_keys", None) is None:
        model._tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}


def _name_both_embeddings(config: LoraConfig) -> None:
    """List both tied embedding modules in ``modules_to_save``; peft ties them when
    ``lm_head`` is listed and the model declares the tie."""
    names = list(config.modules_to_save or [])
    config.modules_to_save = names + [m for m in EMBEDDINGS if m not in names]


def _register_quant_layers(model: nn.Module, config: LoraConfig) -> None:
    """Let peft wrap our Int4 ``QuantLinear`` layers (when ``model`` has any) with its GPTQ
    LoRA layer, which adds ``B(A(x)) * scale`` to the frozen layer's output; registered
    through peft's ``LoraConfig._register_custom_module`` (not saved with the adapter)."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        from peft.tuners.lora.gptq import GPTQLoraLinear

        config._register_custom_module({QuantLinear: GPTQLoraLinear})


def _quiet_peft_deprecation() -> None:
    """Hide the FutureWarning peft triggers by asking transformers a deprecated question."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _is_tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def apply_lora(
    model: nn.Module,
    settings: LoraSettings | None = None,
    *,
    train_embeddings: bool | None = None,
    fix_vit: bool = True,
    train_resampler: bool = True,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` (changed in place) with LoRA adapters; returns the peft model.

    ``train_embeddings`` trains ``transformer.wte`` and ``lm_head`` in full, which
    the base Qwen-VL needs (its ChatML tokens are untrained) and the chat model
    does not; ``None`` means ``False`` (the chat model): pass ``True`` for the base
    model. With tied embeddings one shared copy trains. ``fix_vit`` and
    ``train_resampler`` choose the vision parts that train in full (see
    ``trainable.vision_modules_to_save``). Only the adapters and these parts
    require gradients.
    """
    if isinstance(model, PeftModel):
        raise TypeError("the model already carries adapters (it is a PeftModel)")
    settings = settings or LoraSettings()
    resolve_targets(model, settings.targets)
    modules_to_save = vision_modules_to_save(fix_vit=fix_vit, train_resampler=train_resampler)
    tie = bool(train_embeddings) and _is_tied(model)
    if train_embeddings:
        modules_to_save += list(EMBEDDINGS)
        if tie:
            _declare_tied_embeddings(model)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_pattern(settings.targets),
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=tie,
        bias="none",
    )
    _register_quant_layers(model, config)
    with warnings.catch_warnings():
        _quiet_peft_deprecation()
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if tie:
        # peft drops lm_head from the list once tied to wte; keep it so a reload ties them again
        _name_both_embeddings(peft_model.peft_config[adapter_name])
    freeze_fixed_parameters(peft_model)
    return peft_model


def atomic_directory(final: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``final``.

    The temporary directory sits next to ``final`` and is removed if ``write``
    fails, so ``final`` is either absent, the old directory, or complete. An
    existing ``final`` is replaced only with ``overwrite``.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (choose another directory or allow overwriting)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        write(tmp)
        if not final.exists():
            os.replace(tmp, final)
            return final
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_adapter(peft_model: PeftModel, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the adapter in peft's format (``adapter_config.json`` +
    ``adapter_model.safetensors``) to ``out_dir``, atomically."""
    return atomic_directory(out_dir, lambda tmp: peft_model.save_pretrained(tmp), overwrite=overwrite)


def adapter_weight_file(adapter_dir: str | Path) -> Path:
    """The weight file of a peft adapter directory."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a peft adapter directory)")
    for name in ADAPTER_WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise FileNotFoundError(f"{adapter_dir}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")


def _adapter_file_keys(path: Path) -> set[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    return set(torch.load(path, map_location="cpu", weights_only=True))


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, *, trainable: bool = False, adapter_name: str = "default"
) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter_dir)`` for our model, checked.

    Also reads adapters saved with ``task_type: "CAUSAL_LM"`` (the official
    script's), keeps tied embeddings tied, and raises ``ValueError`` listing the
    keys when the adapter's tensors do not match the adapter layers built on
    ``model`` (for example an adapter made for another model size).
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_weight_file(adapter_dir)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: peft_type {config.peft_type} is not LORA")
    config.task_type = None
    _register_quant_layers(model, config)
    saved = set(config.modules_to_save or [])
    if _is_tied(model) and any(name.split(".")[-1] in ("wte", "lm_head") for name in saved):
        _declare_tied_embeddings(model)
        _name_both_embeddings(config)
    with warnings.catch_warnings():
        _quiet_peft_deprecation()
        peft_model = PeftModel.from_pretrained(
            model, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable, config=config
        )
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    found = _adapter_file_keys(weights)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = [f"{weights} does not match the adapter layers built on the model:"]
        if missing:
            parts.append(f"missing ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected[:10])}")
        raise ValueError("\n  ".join(parts))
    if trainable:
        freeze_fixed_parameters(peft_model)
    return peft_model


# ----- Q-LoRA: LoRA over a 4-bit base (Int4 GPTQ, or NF4 on the fly) ---------
class QLoraUnavailableError(RuntimeError):
    """Q-LoRA over a float base (NF4 on the fly) was asked for where it cannot run
    (no CUDA GPU or no bitsandbytes)."""


def check_qlora_support(device: str | torch.device = "cuda") -> None:
    """Raise ``QLoraUnavailableError`` naming what is missing for Q-LoRA on ``device``."""
    device = torch.device(device)
    problems = []
    if device.type != "cuda":
        problems.append(f"the device is {device}, not a CUDA GPU")
    elif not torch.cuda.is_available():
        problems.append("no CUDA GPU is available to this process")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if problems:
        raise QLoraUnavailableError(
            "--q-lora needs a CUDA GPU and the bitsandbytes package; "
            + "; ".join(problems)
            + ". Plain LoRA (without --q-lora) runs on any device, and so does --q-lora over an Int4 GPTQ "
            "checkpoint (see qwen-vl quantize)."
        )


def _quantization_method(base_dir: Path) -> str | None:
    path = base_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{base_dir}: no config.json (not a checkpoint directory)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    quantization = config.get("quantization_config") or {}
    return quantization.get("quant_method") if isinstance(quantization, dict) else None


def quantize_llm_linears(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every linear layer of the decoder blocks by a bitsandbytes NF4
    ``Linear4bit`` (double quantization, ``compute_dtype`` matmuls) on ``device``;
    returns how many were replaced. The vision tower, ``wte`` and ``lm_head``
    keep their dtype."""
    import bitsandbytes as bnb

    inside_blocks = re.compile(rf"{re.escape(LLM_BLOCKS)}\.\d+\..+")
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not inside_blocks.fullmatch(name):
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            module.weight.data.to(compute_dtype), requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data.to(compute_dtype), requires_grad=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, quantized.to(device))  # quantizes on the GPU
        replaced += 1
    return replaced


def load_qlora_base(
    base_dir: str | Path,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    gradient_checkpointing: bool = True,
) -> nn.Module:
    """Load ``base_dir`` as a Q-LoRA base: decoder linear layers in 4 bits on ``device``,
    everything frozen, ready for ``apply_lora``.

    An Int4 GPTQ checkpoint (Qwen-VL-Chat-Int4, or one ``qwen-vl quantize`` wrote) keeps
    its own ``QuantLinear`` layers and runs on any device, CPU included; a float
    checkpoint is quantized to bitsandbytes NF4 on load, which needs a CUDA GPU
    (``QLoraUnavailableError`` otherwise). As peft's ``prepare_model_for_kbit_training``:
    the decoder's RMSNorm weights become float32 and gradient checkpointing is on
    (unless turned off).
    """
    from ..model.llm import RMSNorm
    from ..modeling import QWenLMHeadModel
    from .trainable import enable_gradient_checkpointing

    base_dir = Path(base_dir)
    method = _quantization_method(base_dir)
    if method not in (None, "gptq"):
        raise ValueError(f"{base_dir / 'config.json'}: quantization_config.quant_method {method!r} is not supported")
    if method is None and not (base_dir / QUANTIZE_CONFIG).is_file():
        check_qlora_support(device)
        device = torch.device(device)
        model = QWenLMHeadModel.from_pretrained(base_dir, dtype=compute_dtype, device="cpu")
        quantize_llm_linears(model, compute_dtype, device)
        model.to(device)
        model.is_loaded_in_4bit = True  # peft chooses its 4-bit LoRA layers from this flag
    else:
        model = QWenLMHeadModel.from_pretrained(base_dir, dtype=compute_dtype, device=device)
    model.requires_grad_(False)
    for module in model.transformer.modules():
        if isinstance(module, RMSNorm):
            module.float()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
