"""Options shared by the subcommands, as typed values and as argparse flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat import DEFAULT_SYSTEM
from ..engine.decode_step import DECODE_MODES
from ..engine.sampling import SamplingParams
from ..images import ImagePolicy

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelOptions:
    """Where the model comes from and how it is placed."""

    model_dir: str | Path
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's dtype elsewhere
    max_seq_len: int | None = None  # None: the model's max_position_embeddings
    quiet: bool = False
    decode_mode: str = "auto"  # the engine's decode step: auto, eager or compile

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "float32" if self.device == "cpu" else "auto"


@dataclass
class GenerationOptions:
    """How one answer is generated; None takes the checkpoint's generation_config.json value."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    system: str = DEFAULT_SYSTEM

    def sampling(self, generation_config: Any = None) -> SamplingParams:
        """The sampling parameters: these options over ``generation_config``'s fields."""
        try:
            return SamplingParams.from_generation_config(
                generation_config,
                do_sample=self.do_sample,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                repetition_penalty=self.repetition_penalty,
                seed=self.seed,
            ).validate()
        except ValueError as e:
            raise ValueError(f"bad sampling option: {e}") from None

    def new_tokens(self, generation_config: Any = None) -> int:
        """``max_new_tokens``, else the generation config's, else 512."""
        value = self.max_new_tokens
        if value is None:
            value = getattr(generation_config, "max_new_tokens", None) or 512
        if value < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {value}")
        return int(value)


@dataclass
class ImageOptions:
    """Which images paths and URLs written in prompts may open."""

    allow_roots: list[str] = field(default_factory=list)  # empty: the working directory
    allow_url: bool = False
    allowed_hosts: list[str] = field(default_factory=list)

    def policy(self) -> ImagePolicy:
        roots = tuple(str(Path(r).expanduser()) for r in self.allow_roots) or None
        return ImagePolicy(
            allowed_roots=roots,
            allow_urls=self.allow_url or bool(self.allowed_hosts),
            allowed_hosts=tuple(self.allowed_hosts),
        )


# ----- argparse ---------------------------------------------------------------
def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="demo",
        metavar="DIR",
        help="local checkpoint directory, or demo (the bundled demo model; the default)",
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    group.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default float32 on CPU, the checkpoint's dtype on GPU"
    )
    group.add_argument(
        "--max-seq-len", type=int, default=None, help="KV cache positions (default: the model's maximum)"
    )
    group.add_argument(
        "--decode-mode",
        choices=DECODE_MODES,
        default="auto",
        help="decode step: eager, compiled (torch.compile, CUDA graphs on GPU; opt-in), or auto (eager for now)",
    )
    group.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (defaults: the checkpoint's generation_config.json)")
    group.add_argument("--max-new-tokens", type=int, default=None)
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_true", default=None, help="sample")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--seed", type=int, default=None, help="seed of the sampling draws")
    group.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("images")
    group.add_argument(
        "--image", action="append", default=[], metavar="IMG", help="image file or URL (repeat for several)"
    )
    group.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help="folder that image paths written in prompts may come from (repeatable; default: working directory)",
    )
    group.add_argument("--allow-url", action="store_true", help="let prompts name http(s) image URLs")
    group.add_argument(
        "--allowed-host", action="append", default=[], metavar="HOST", help="only these URL hosts (implies --allow-url)"
    )


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(args.model, args.device, args.dtype, args.max_seq_len, args.quiet, args.decode_mode)


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        system=args.system,
    )


def image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(list(args.allow_root), args.allow_url, list(args.allowed_host))
