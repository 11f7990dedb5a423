"""The ``qwen-vl`` command: ``qwen-vl chat`` for now, each subcommand a thin shell
over a typed function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def chat_once(
    model_dir: str | Path,
    query: str,
    images: Sequence[str | Path] = (),
    max_new_tokens: int = 64,
    do_sample: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int | None = None,
) -> str:
    """Load ``model_dir`` and answer ``query`` about the given image files.

    Image files named here are trusted (the user chose them) and opened directly;
    paths inside the query text are still subject to the model's image policy.
    """
    from .images import ImagePolicy, load_image
    from .modeling import QWenLMHeadModel
    from .tokenizer import QWenTokenizer

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: not a checkpoint directory")
    tokenizer = QWenTokenizer.from_pretrained(model_dir)
    model = QWenLMHeadModel.from_pretrained(model_dir, dtype=dtype, device=device)
    parts: list[dict] = [{"image": str(p)} for p in images] + [{"text": query}]
    prompt = tokenizer.from_list_format(parts)
    loaded = {str(p): load_image(p, ImagePolicy(allowed_roots=(Path(p).resolve().parent,))) for p in images}
    response, _ = model.chat(
        tokenizer, prompt, history=None, images=loaded, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed
    )
    return response


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-vl", description="Qwen-VL vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="answer one question about images")
    chat.add_argument("query", help="the question")
    chat.add_argument("--model", required=True, help="local checkpoint directory")
    chat.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--dtype", default="float32", help="auto, float32, bfloat16 or float16")
    chat.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "chat":
        try:
            print(
                chat_once(
                    args.model,
                    args.query,
                    args.image,
                    args.max_new_tokens,
                    args.sample,
                    args.dtype,
                    args.device,
                    args.seed,
                )
            )
        except (OSError, ValueError) as e:
            print(f"qwen-vl: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
