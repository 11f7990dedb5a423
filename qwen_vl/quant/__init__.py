"""Int4 GPTQ models: the AutoGPTQ checkpoint layout, ``QuantLinear``, its kernels, and GPTQ itself.

* ``config``: ``quantization_config`` / ``quantize_config.json`` → ``GPTQConfig``
* ``packing``: the bit layout of ``qweight`` / ``qzeros`` and reference dequantisation
* ``linear``: ``QuantLinear``; ``kernels``: which int4 matmul it runs (chosen at load)
* ``loading``: builds ``QuantLinear`` layers where a checkpoint has ``qweight`` tensors
* ``gptq``: the algorithm on one matrix; ``blocks``: through the decoder, block by block
* ``calibration``: conversations → samples; ``writer``: the official Int4 directory
* ``quantize``: ``quantize_checkpoint``, the function behind ``qwen-vl quantize``
"""

from .config import GPTQConfig, QuantConfigError, read_gptq_config
from .linear import QuantLinear

__all__ = ["GPTQConfig", "QuantConfigError", "QuantLinear", "read_gptq_config"]
