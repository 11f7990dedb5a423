"""Out-of-memory during training: recognise it and say which options lower memory.

``settings`` holds the run's current option values under the command-line names, with
dashes or underscores: ``batch_size``, ``gradient_accumulation_steps``,
``model_max_length``, ``gradient_checkpointing``, ``lora``, ``q_lora``, ``fix_vit``,
``deepspeed``, and the precision as ``precision`` (``"bf16"``, ``"fp16"``, ``"fp32"``)
or the flags ``bf16`` / ``fp16``. Missing values are shown as ``not set``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_OOM_PATTERNS = ("out of memory", "can't allocate memory")  # the CPU allocator: "DefaultCPUAllocator: can't ..."
_GPU_WORDS = ("cuda", "gpu", "mps", "hip", "xpu")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _own_kind(e: BaseException) -> str | None:
    """``"gpu"``, ``"cpu"`` or ``None`` for ``e`` itself."""
    if isinstance(e, torch.OutOfMemoryError):
        return "gpu"
    if isinstance(e, MemoryError):
        return "cpu"
    if isinstance(e, RuntimeError):
        text = str(e).lower()
        if any(p in text for p in _OOM_PATTERNS):
            return "gpu" if any(w in text for w in _GPU_WORDS) else "cpu"
    return None


def _first_oom(exc: BaseException) -> BaseException | None:
    """The first out-of-memory error in ``exc`` and the exceptions it was raised from."""
    return next((e for e in _chain(exc) if _own_kind(e) is not None), None)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an out-of-memory error, CPU or GPU."""
    return _first_oom(exc) is not None


def _get(settings: Mapping[str, object], name: str) -> object:
    for key in (name, name.replace("_", "-"), "--" + name.replace("_", "-")):
        if key in settings:
            return settings[key]
    return None


def _shown(value: object) -> str:
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _precision(settings: Mapping[str, object]) -> str | None:
    if _get(settings, "precision") is not None:
        return str(_get(settings, "precision"))
    if _get(settings, "bf16"):
        return "bf16"
    if _get(settings, "fp16"):
        return "fp16"
    return None if _get(settings, "bf16") is None and _get(settings, "fp16") is None else "fp32"


def _batch_advice(batch: object, accum: object) -> str:
    if isinstance(batch, int) and batch > 1:
        accum_n = accum if isinstance(accum, int) and accum > 0 else 1
        half = max(d for d in range(1, batch) if batch % d == 0)  # largest proper divisor
        new_accum = accum_n * batch // half
        return (
            f"--batch-size {half} --gradient-accumulation-steps {new_accum}: smaller micro-batches, "
            f"same global batch ({batch} x {accum_n} = {half} x {new_accum} = {batch * accum_n} per process)"
        )
    return "--batch-size is already 1; raise --gradient-accumulation-steps to keep a larger global batch"


def explain_oom(exc: BaseException, settings: Mapping[str, object]) -> str:
    """A message for an out-of-memory ``exc`` that names the options lowering memory, with current values."""
    first = _first_oom(exc) or exc
    kind = _own_kind(first)
    where = {"gpu": "GPU", "cpu": "CPU (host RAM)"}.get(kind or "", "unknown device")
    detail = (str(first).strip().splitlines() or [type(first).__name__])[0]
    batch, accum = _get(settings, "batch_size"), _get(settings, "gradient_accumulation_steps")
    length, ckpt = _get(settings, "model_max_length"), _get(settings, "gradient_checkpointing")
    lora, q_lora = _get(settings, "lora"), _get(settings, "q_lora")
    fix_vit, deepspeed, precision = _get(settings, "fix_vit"), _get(settings, "deepspeed"), _precision(settings)
    mode = "Q-LoRA" if q_lora else "LoRA" if lora else "full fine-tuning" if lora is not None else "not set"
    half_length = f" (e.g. {length // 2})" if isinstance(length, int) and length > 1 else ""
    lines = [
        f"Out of memory on the {where}: {type(first).__name__}: {detail}",
        "",
        "Current settings: "
        + ", ".join(
            [
                f"--batch-size {_shown(batch)}",
                f"--gradient-accumulation-steps {_shown(accum)}",
                f"--model-max-length {_shown(length)}",
                f"--gradient-checkpointing {_shown(ckpt)}",
                f"mode {mode}",
                f"--fix-vit {_shown(fix_vit)}",
                f"--deepspeed {_shown(deepspeed)}",
                f"precision {_shown(precision)}",
            ]
        ),
        "",
        "Options that lower memory:",
        f"  * {_batch_advice(batch, accum)}",
        f"  * --model-max-length: shorter sequences{half_length}; records longer than it are dropped or fail",
        "  * --gradient-checkpointing: recompute activations in the backward pass"
        + (" (already on)" if ckpt is True else ""),
        "  * --lora, or --q-lora (4-bit base weights, GPU only): train adapters, not every weight"
        + (f" (now {mode})" if mode != "not set" else ""),
        "  * --fix-vit: freeze the vision transformer" + (" (already on)" if fix_vit is True else ""),
    ]
    if kind != "cpu":
        lines.append(
            "  * --deepspeed with a ZeRO-3 config that offloads optimizer states and parameters to the CPU"
            f' (offload_optimizer / offload_param device "cpu"; now {_shown(deepspeed)})'
        )
    now = " (already on)" if precision == "bf16" else f" (now {precision})" if precision else ""
    lines.append(f"  * --bf16: bf16 weights and activations instead of fp32{now}")
    return "\n".join(lines)
