"""``QWenLMHeadModel``: the public model class, named as in the official code.

It is the network (``transformer`` + ``lm_head``) plus loading, generation and the
chat methods users know. Loading builds the modules on the meta device and assigns
the checkpoint's tensors in place (see ``model.loading``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from .bundled import resolve_model_dir
from .config import QWenConfig
from .engine.image_cache import ImageFeatureCache
from .images import ImagePolicy, image_transform, load_image
from .model.image_spans import ImageSpan, span_reference
from .model.llm import RMSNorm
from .model.loading import load_weights
from .model.network import QWenModel
from .model.outputs import QWenCausalLMOutput
from .model.vision import VisionTransformer
from .quant.config import read_gptq_config
from .quant.loading import install_quant_linears, select_kernels

if TYPE_CHECKING:
    from .finetune.loss_vocab import LossVocabulary

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

#: Keyword arguments of hub-based loaders that mean nothing for a local directory.
IGNORED_LOAD_KWARGS = {
    "trust_remote_code",
    "revision",
    "cache_dir",
    "local_files_only",
    "low_cpu_mem_usage",
    "use_safetensors",
    "force_download",
    "token",
    "subfolder",
    "_from_auto",
    "_from_pipeline",
    "_commit_hash",
    "adapter_kwargs",
}


def resolve_dtype(dtype: str | torch.dtype | None, config: QWenConfig) -> torch.dtype:
    """``"auto"`` → the config's ``torch_dtype``; names like "bf16" → torch dtypes."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if configured is None:
            return torch.float32
        return configured if isinstance(configured, torch.dtype) else resolve_dtype(str(configured), config)
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[name]


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualAttentionBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Random initialisation for models built from a config (not loaded)."""
        std = self.config.initializer_range
        if isinstance(module, VisionTransformer):
            module.init_weights()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.Linear) and not _inside_vision(self, module):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)


def _target_device(device: str | torch.device | None, device_map: str | torch.device | None) -> torch.device:
    """``device`` if given; else a single-device ``device_map`` ("auto" = CUDA when present); else CPU."""
    if device is not None:
        return torch.device(device)
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        raise ValueError("device_map dictionaries are not supported: the model is placed on one device")
    return torch.device(device_map)


def _inside_vision(model: nn.Module, module: nn.Module) -> bool:
    visual = getattr(getattr(model, "transformer", None), "visual", None)
    return visual is not None and any(m is module for m in visual.modules())


class QWenLMHeadModel(QWenPreTrainedModel):
    """Qwen-VL / Qwen-VL-Chat: vision tower + resampler + Qwen LLM + LM head."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # tied only with tie_word_embeddings

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.image_policy = ImagePolicy()
        self.image_cache: ImageFeatureCache | None = None
        self.generation_config = GenerationConfig(
            chat_format="chatml", max_window_size=6144, eos_token_id=151643, pad_token_id=151643
        )
        self.post_init()

    # ----- loading ---------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        config: QWenConfig | None = None,
        torch_dtype: str | torch.dtype | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | torch.device | None = None,
        image_policy: ImagePolicy | None = None,
        quant_kernel: str = "auto",
        **kwargs: Any,
    ) -> QWenLMHeadModel:
        """Load an official checkpoint directory (sharded or single ``.bin`` /
        ``.safetensors``; ``"demo"``: the bundled demo model) into ``dtype`` ("auto" =
        the config's) on ``device``.

        An Int4 GPTQ checkpoint (``quantization_config`` / ``quantize_config.json``) gets
        ``QuantLinear`` layers where its files hold ``qweight`` tensors; ``quant_kernel``
        ("auto", "reference", "tinygemm") chooses their int4 matmul once, here
        (see ``qwen_vl.quant.kernels``)."""
        if model_args:
            raise TypeError(f"unexpected positional arguments: {model_args!r}")
        unknown = set(kwargs) - IGNORED_LOAD_KWARGS
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        ckpt_dir = resolve_model_dir(pretrained_model_name_or_path)
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(
                f"{ckpt_dir}: not a checkpoint directory (models are loaded from a local folder holding "
                "config.json and the weight files; nothing is downloaded)"
            )
        if config is None:
            config = QWenConfig.from_pretrained(ckpt_dir)
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError("give either dtype or torch_dtype, not both")
        compute_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config)
        target = _target_device(device, device_map)
        gptq = read_gptq_config(ckpt_dir, getattr(config, "quantization_config", None))
        with torch.device("meta"):
            model = cls(config)
        if gptq is not None:
            install_quant_linears(model, ckpt_dir, gptq)
        tied = {"lm_head.weight": "transformer.wte.weight"} if config.tie_word_embeddings else {}
        load_weights(model, ckpt_dir, compute_dtype, target, tied=tied)
        if gptq is not None:
            select_kernels(model, compute_dtype, quant_kernel, device=target)
        model.config.dtype = compute_dtype
        model.eval()
        if image_policy is not None:
            model.image_policy = image_policy
        if (ckpt_dir / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(ckpt_dir)
        model.name_or_path = str(ckpt_dir)
        return model

    # ----- forward ---------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def span_sources(self, input_ids: torch.Tensor, spans: list[ImageSpan], images: Any) -> list[Any]:
        """What fills each span: the given ``images`` (a list in span order, or a
        mapping from the path written in the span), else the span's own path/URL."""
        if isinstance(images, Mapping):
            refs = [span_reference(input_ids, s, self.config.image_pad_id) for s in spans]
            missing = [r for r in refs if r not in images]
            if missing:
                raise ValueError(f"no image given for <img> spans: {', '.join(missing)}")
            return [images[r] for r in refs]
        if images is not None:
            if len(images) != len(spans):
                raise ValueError(f"{len(images)} images given for {len(spans)} <img> spans in the prompt")
            return list(images)
        return [span_reference(input_ids, s, self.config.image_pad_id) for s in spans]

    def span_encoder(self, images: Sequence[Any] | Mapping[str, Any] | None):
        """Image encoder for the spans of a prompt (see ``span_sources``); images are
        opened under ``self.image_policy`` and, when ``self.image_cache`` is set,
        each distinct image is encoded once."""
        visual = self.transformer.visual
        size = int(self.config.visual["image_size"])

        def encode(input_ids: torch.Tensor, spans: list[ImageSpan]) -> torch.Tensor:
            pixels = []
            for source in self.span_sources(input_ids, spans, images):
                if isinstance(source, torch.Tensor):
                    pixels.append(source)
                else:
                    pixels.append(image_transform(load_image(source, self.image_policy), size))
            pixels = [p.to(device=input_ids.device) for p in pixels]
            if self.image_cache is not None:
                return self.image_cache.encode(pixels, visual)
            return visual(torch.stack(pixels))  # (N, 256, C)

        return encode

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: Sequence[Any] | None = None,
        kv_cache=None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        loss_reduction: str = "mean",
        compute_logits: bool = True,
        loss_vocab: LossVocabulary | None = None,
        **kwargs: Any,
    ) -> QWenCausalLMOutput:
        """Logits (B, T, vocab) for ``input_ids`` (B, T).

        ``images`` (PIL images, paths, bytes, or pixel tensors (3, S, S)) fill the
        ``<img>`` spans in order; without them the spans' own paths are opened
        under ``self.image_policy``. ``logits_to_keep`` > 0 computes logits of the
        last positions only. ``labels`` (-100 = ignored) give a shifted LM loss,
        the ``loss_reduction`` ("mean" or "sum") of the labelled tokens' losses; it
        divided by ``num_items_in_batch`` instead of their count when the Trainer
        passes it (gradient accumulation). It runs ``lm_head`` on the labelled positions only, so with
        ``compute_logits=False`` (logits None) training never builds (B, T, vocab).
        ``loss_vocab`` (``qwen_vl.finetune.loss_vocab.LossVocabulary``) runs the loss's
        softmax over the data's tokens and a sample of the others instead of every row.
        """
        for unused in ("past_key_values", "use_cache", "position_ids", "token_type_ids", "output_attentions"):
            kwargs.pop(unused, None)
        if kwargs.get("inputs_embeds", 0) is None:
            kwargs.pop("inputs_embeds")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # Trainer: tokens of the whole accumulated batch
        if kwargs:
            raise TypeError(f"forward got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        want_hidden = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        h, hidden_states = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            kv_cache=kv_cache,
            encode_spans=self.span_encoder(images),
            output_hidden_states=want_hidden,
        )
        loss = None
        if labels is not None:
            if loss_reduction not in ("mean", "sum"):
                raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
            shift_labels = labels[:, 1:].to(h.device)  # (B, T-1)
            labelled = shift_labels != -100
            hidden, targets = h[:, :-1][labelled], shift_labels[labelled]  # labelled positions only
            if loss_vocab is None:
                picked = self.lm_head(hidden).float()  # (N, vocab)
            else:
                picked, targets = loss_vocab.logits_and_targets(hidden, self.lm_head.weight, targets)
            if num_items_in_batch is not None and loss_reduction == "mean":
                loss = F.cross_entropy(picked, targets, reduction="sum") / num_items_in_batch
            else:
                loss = F.cross_entropy(picked, targets, reduction=loss_reduction)
        elif not compute_logits:
            raise ValueError(
                "compute_logits=False is for training with labels: without them there is nothing to return"
            )
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h) if compute_logits else None
        return QWenCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=kv_cache,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )

    # ----- generation and chat --------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Prompt ids (B, T) followed by the generated ids (B, T + n); see
        ``qwen_vl.engine.generate.generate`` for the arguments."""
        from .engine.generate import generate

        return generate(self, input_ids, **kwargs)

    def chat(self, tokenizer, query: str, history=None, **kwargs: Any) -> tuple[str, list[tuple[str, str]]]:
        """One chat turn: ``(response, history + [(query, response)])``; see ``qwen_vl.chat.chat``."""
        from .chat import chat

        return chat(self, tokenizer, query, history, **kwargs)

    def chat_stream(self, tokenizer, query: str, history=None, **kwargs: Any) -> Iterator[str]:
        """Stream one chat turn's response text; see ``qwen_vl.chat.chat_stream``."""
        from .chat import chat_stream

        return chat_stream(self, tokenizer, query, history, **kwargs)
