"""Typed, checked generation fields of a request body (everything but the messages or prompt).

Fields the server does not honour are refused by name unless they ask for the default
(``frequency_penalty: 0``, ``logprobs: false``), so a client never silently gets
something other than what it asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling import SamplingParams
from .errors import APIError, invalid
from .limits import ServerLimits

_UNSUPPORTED_UNLESS_DEFAULT = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "top_logprobs": (0, None),
    "logit_bias": (None,),
    "tools": (None,),
    "tool_choice": (None, "none"),
    "functions": (None,),
    "best_of": (1, None),
    "echo": (False, None),
    "suffix": (None,),
}


@dataclass
class GenerationFields:
    """What a request asks of the generation: sampling, length, stops, choices, streaming."""

    model: str
    sampling: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False


def _number(body: dict[str, Any], name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"must be a number, got {value!r}", "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(name, f"must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"must be an integer, got {value!r}", "invalid_type")
    if value < low or (high is not None and value > high):
        upper = f" and at most {high}" if high is not None else ""
        raise invalid(name, f"must be at least {low}{upper}, got {value}")
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"must be true or false, got {value!r}", "invalid_type")
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", f"must be a string or a list of strings, got {value!r}", "invalid_type")
    if len(stops) > 4:
        raise invalid("stop", f"at most 4 stop strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise invalid("stop", "stop strings must not be empty")
    return stops


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, defaults in _UNSUPPORTED_UNLESS_DEFAULT.items():
        if name in body and body[name] not in defaults:
            raise invalid(name, "is not supported by this server", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise invalid("response_format", "only {'type': 'text'} is supported", "unsupported_parameter")


def generation_fields(body: dict[str, Any], limits: ServerLimits, generation_config: Any) -> GenerationFields:
    """The checked generation fields of ``body``; unset ones take the checkpoint's
    ``generation_config``. ``temperature: 0`` means greedy decoding."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", f"must be a non-empty string, got {model!r}", "invalid_type")
    _check_unsupported(body)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    top_k = _integer(body, "top_k", 0)
    penalty = _number(body, "repetition_penalty", 0, 10, low_open=True)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    do_sample = None
    if temperature is not None:
        do_sample = temperature > 0
    elif top_p is not None:
        do_sample = True
    sampling = SamplingParams.from_generation_config(
        generation_config,
        do_sample=do_sample,
        temperature=temperature if temperature else None,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=penalty,
        seed=seed,
    )
    max_tokens = _max_tokens(body, limits, generation_config)
    n = _integer(body, "n", 1, limits.max_n) or 1
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict):
            raise invalid("stream_options", f"must be an object, got {options!r}", "invalid_type")
        include_usage = _boolean(options, "include_usage")
    return GenerationFields(model, sampling, max_tokens, _stop(body), n, stream, include_usage)


def _max_tokens(body: dict[str, Any], limits: ServerLimits, generation_config: Any) -> int:
    new = _integer(body, "max_completion_tokens", 1)
    name = "max_completion_tokens"
    if new is None:
        new, name = _integer(body, "max_tokens", 1), "max_tokens"
    if new is None:
        default = getattr(generation_config, "max_new_tokens", None) or 512
        return min(int(default), limits.max_tokens)
    if new > limits.max_tokens:
        raise APIError(
            400, f"{name}: at most {limits.max_tokens} on this server, got {new}", param=name, code="invalid_value"
        )
    return new
