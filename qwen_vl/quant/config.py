"""The GPTQ settings of a checkpoint: ``config.json``'s ``quantization_config`` and
AutoGPTQ's ``quantize_config.json``.

Qwen-VL-Chat-Int4 carries both (bits 4, group_size 128, sym true, desc_act false);
a checkpoint may carry either. When both are present they must agree on the fields
that change the tensors' meaning (bits, group size, symmetry, act-order, format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUANTIZE_CONFIG = "quantize_config.json"
#: ``checkpoint_format`` values: "gptq" stores each zero point minus one (AutoGPTQ, the
#: official files); "gptq_v2" stores the zero point itself (GPTQModel's internal format).
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
SUPPORTED_BITS = (4,)
_MEANINGFUL = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")


class QuantConfigError(ValueError):
    """A quantization config that qwen-vl cannot run, naming the file and the field."""


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings, with the official field names.

    ``group_size`` -1 means one group per output column (the whole input
    dimension). ``desc_act`` (act-order) quantizes columns in order of decreasing
    Hessian diagonal; the tensors then carry that order in ``g_idx``.
    ``damp_percent`` and ``true_sequential`` only matter when quantizing.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(
                f"bits={self.bits} is not supported: qwen-vl runs and writes 4-bit GPTQ only (bits=4)"
            )
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise QuantConfigError(f"group_size must be a positive integer or -1, got {self.group_size!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            known = ", ".join(CHECKPOINT_FORMATS)
            raise QuantConfigError(
                f"checkpoint_format {self.checkpoint_format!r} is not supported (use one of {known})"
            )
        if not 0 < self.damp_percent < 1:
            raise QuantConfigError(f"damp_percent must be in (0, 1), got {self.damp_percent!r}")

    @property
    def zero_offset(self) -> int:
        """What dequantisation adds to a stored zero point: 1 for "gptq" (v1), 0 for "gptq_v2"."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def group_size_for(self, in_features: int) -> int:
        """Columns per group of a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def to_dict(self) -> dict[str, Any]:
        """The fields AutoGPTQ writes to ``quantize_config.json`` (and ``quantization_config``)."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "quantization config") -> GPTQConfig:
        """Read the official fields (unknown ones are ignored); raises ``QuantConfigError``."""
        if not isinstance(data, dict):
            raise QuantConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        method = str(data.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise QuantConfigError(f"{source}: quant_method {method!r} is not supported (only 'gptq')")
        fields: dict[str, Any] = {}
        for name, kind in (
            ("bits", int),
            ("group_size", int),
            ("sym", bool),
            ("desc_act", bool),
            ("damp_percent", float),
            ("true_sequential", bool),
            ("static_groups", bool),
            ("checkpoint_format", str),
        ):
            if data.get(name) is None:
                continue
            value = data[name]
            if kind is bool and not isinstance(value, bool):
                raise QuantConfigError(f"{source}: {name} must be true or false, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise QuantConfigError(f"{source}: {name} must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise QuantConfigError(f"{source}: {name} must be a number, got {value!r}")
            fields[name] = kind(value) if kind is float else value
        try:
            return cls(**fields)
        except QuantConfigError as e:
            raise QuantConfigError(f"{source}: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QuantConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def read_gptq_config(ckpt_dir: str | Path, quantization_config: Any = None) -> GPTQConfig | None:
    """The GPTQ settings of ``ckpt_dir``, or None for a float checkpoint.

    ``quantization_config`` is ``config.json``'s field (read from the file when
    None); ``quantize_config.json`` is read too. A ``quant_method`` other than
    "gptq" and disagreeing files raise ``QuantConfigError``.
    """
    ckpt_dir = Path(ckpt_dir)
    if quantization_config is None and (ckpt_dir / "config.json").is_file():
        quantization_config = _read_json(ckpt_dir / "config.json").get("quantization_config")
    if quantization_config is not None and not isinstance(quantization_config, dict):
        quantization_config = getattr(quantization_config, "to_dict", lambda: quantization_config)()
    from_config = (
        GPTQConfig.from_dict(quantization_config, f"{ckpt_dir / 'config.json'}: quantization_config")
        if quantization_config
        else None
    )
    path = ckpt_dir / QUANTIZE_CONFIG
    from_file = GPTQConfig.from_dict(_read_json(path), str(path)) if path.is_file() else None
    if from_config is not None and from_file is not None:
        differ = [n for n in _MEANINGFUL if getattr(from_config, n) != getattr(from_file, n)]
        if differ:
            detail = ", ".join(f"{n}: {getattr(from_config, n)!r} vs {getattr(from_file, n)!r}" for n in differ)
            raise QuantConfigError(
                f"{ckpt_dir}: config.json's quantization_config and {QUANTIZE_CONFIG} disagree ({detail})"
            )
    return from_config or from_file
