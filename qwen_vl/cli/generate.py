"""``qwen-vl generate``: one answer about some images, as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .annotate import save_boxes
from .image_store import ImageStore
from .loading import check_model_dir, load_model, load_tokenizer
from .options import (
    GenerationOptions,
    ImageOptions,
    ModelOptions,
    add_generation_flags,
    add_image_flags,
    add_model_flags,
    generation_options,
    image_options,
    model_options,
)
from .session import Answer, ChatSession, TextSink


def answer_once(
    model,
    tokenizer,
    prompt: str,
    images: Sequence[str | Path] = (),
    options: GenerationOptions | None = None,
    images_allowed: ImageOptions | None = None,
    raw: bool = False,
    max_seq_len: int | None = None,
    save_dir: str | Path | None = None,
    on_text: TextSink | None = None,
    store: ImageStore | None = None,
    decode_mode: str = "auto",
) -> Answer:
    """Answer ``prompt`` about ``images`` with a loaded model: a chat turn (as ``model.chat``)
    or, with ``raw=True``, a continuation of the text. With ``save_dir``, boxes in the
    answer are drawn on the image and saved there (``Answer.annotated``). ``store`` may
    hold images loaded already (``images_allowed`` then does not apply)."""
    if store is None:
        store = ImageStore((images_allowed or ImageOptions()).policy())
    with ChatSession(model, tokenizer, options, store, max_seq_len, decode_mode) as session:
        for source in images:
            session.attach(str(source))
        answer = session.ask(prompt, on_text=on_text, raw=raw)
    if save_dir is not None:
        answer.annotated = save_boxes(answer.response, [answer.query], store, save_dir)
    return answer


def generate(
    model: ModelOptions | str | Path,
    prompt: str,
    images: Sequence[str | Path] = (),
    options: GenerationOptions | None = None,
    images_allowed: ImageOptions | None = None,
    raw: bool = False,
    save_dir: str | Path | None = None,
) -> Answer:
    """Load the checkpoint and answer once; bad input raises CliError or ValueError
    (naming the problem) before the weights are read where it can."""
    model_opts = model if isinstance(model, ModelOptions) else ModelOptions(model)
    check_model_dir(model_opts.model_dir)
    tokenizer = load_tokenizer(model_opts.model_dir)
    store = ImageStore((images_allowed or ImageOptions()).policy())
    refs = [store.add_named(str(s)) for s in images]  # fail on a bad image before loading weights
    parts = [{"image": r} for r in refs] + [{"text": prompt}]
    store.resolve(tokenizer.from_list_format(parts))
    loaded = load_model(model_opts)
    return answer_once(
        loaded, tokenizer, prompt, refs, options, raw=raw, max_seq_len=model_opts.max_seq_len, save_dir=save_dir,
        store=store, decode_mode=model_opts.decode_mode,
    )  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="answer one prompt about images",
        description="Answer one prompt: a chat turn (ChatML, as model.chat) or, with --raw, a text continuation.",
    )
    p.add_argument("--prompt", required=True, help="the question or text")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the answer")
    p.add_argument("--raw", action="store_true", help="continue the prompt as raw text (no ChatML)")
    p.add_argument("--save-dir", default=None, metavar="DIR", help="draw the answer's boxes on the image here")
    add_model_flags(p)
    add_image_flags(p)
    add_generation_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    answer = generate(
        model_options(args),
        args.prompt,
        args.image,
        generation_options(args),
        image_options(args),
        raw=args.raw,
        save_dir=args.save_dir,
    )
    if args.json:
        print(json.dumps(answer.to_json(), ensure_ascii=False))
    else:
        print(answer.response)
        if answer.annotated is not None:
            print(f"qwen-vl: boxes drawn in {answer.annotated}", file=sys.stderr)
    return 0
