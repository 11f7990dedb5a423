"""Register the ``qwen`` model type with transformers' Auto classes.

After ``register()``, ``AutoConfig``, ``AutoTokenizer`` and ``AutoModelForCausalLM``
``.from_pretrained(dir)`` on an official Qwen-VL folder return
:class:`~qwen_vl.config.QWenConfig`, :class:`~qwen_vl.tokenizer.QWenTokenizer` and
:class:`~qwen_vl.modeling.QWenLMHeadModel` without ``trust_remote_code``: transformers prefers a
registered local class over the remote code named in the folder's ``auto_map``.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import AutoConfig, AutoTokenizer

_registered = False


def _config() -> None:
    from .config import QWenConfig

    AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)


def _tokenizer() -> None:
    from .config import QWenConfig
    from .tokenizer import QWenTokenizer

    AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)


def _causal_lm() -> None:
    from transformers import AutoModelForCausalLM

    from .config import QWenConfig
    from .modeling import QWenLMHeadModel

    AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)


#: One entry per Auto class; each call registers one class (safe to repeat).
REGISTRATIONS: list[Callable[[], None]] = [_config, _tokenizer, _causal_lm]


def register() -> None:
    """Register every class in :data:`REGISTRATIONS`; later calls do nothing."""
    global _registered
    if _registered:
        return
    for registration in REGISTRATIONS:
        registration()
    _registered = True
