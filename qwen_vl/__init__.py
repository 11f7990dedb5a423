"""qwen-vl: the Qwen-VL family of vision-language models, fast and safe.

Importing the package registers model type ``qwen`` with transformers' Auto
classes, so ``AutoConfig`` / ``AutoTokenizer`` / ``AutoModelForCausalLM``
``.from_pretrained(dir)`` return these classes without ``trust_remote_code``.
"""

from .chat_format import decode_tokens, get_stop_words_ids, make_context
from .config import QWenConfig
from .images import ImagePolicy, load_image
from .modeling import QWenLMHeadModel
from .registration import register
from .tokenizer import QWenTokenizer

register()

__version__ = "0.1.0"

__all__ = [
    "ImagePolicy",
    "QWenConfig",
    "QWenLMHeadModel",
    "QWenTokenizer",
    "decode_tokens",
    "get_stop_words_ids",
    "load_image",
    "make_context",
    "register",
]
