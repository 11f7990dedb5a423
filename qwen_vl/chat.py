"""``chat`` and ``chat_stream``: one conversation turn over ``generate``.

Defaults reproduce the official ``model.chat``: ChatML context with the system
prompt "You are a helpful assistant.", stop words ``<|im_end|>`` / ``<|im_start|>``
plus any given, and the response cut at the first of them. One quirk of the
official code is kept by default because published results depend on it: when
no stop word ended the answer (``max_new_tokens`` reached), the last generated
token is dropped. ``keep_last_token=True`` keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .chat_format import decode_tokens, get_stop_words_ids
from .context import fit_context
from .engine.detokenize import IncrementalDetokenizer
from .engine.generate import as_id_list, generate_stream, resolve_generation_config, window_size

DEFAULT_SYSTEM = "You are a helpful assistant."

History = list[tuple[str, str]]


def _prepare(model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs):
    overflow = kwargs.pop("overflow", "drop_oldest")
    budget = kwargs.pop("max_context_tokens", None)
    gen_keys = {k: kwargs.pop(k) for k in list(kwargs) if k != "max_window_size"}
    gc = resolve_generation_config(model, generation_config, **gen_keys)
    chat_format = getattr(gc, "chat_format", "chatml")
    if chat_format != "chatml":
        raise ValueError(f"chat needs generation_config.chat_format 'chatml', got {chat_format!r}")
    max_window_size = kwargs.pop("max_window_size", None) or window_size(gc)
    limit = model.config.max_position_embeddings - 1  # room for at least one new token
    budget = min(budget, limit) if budget is not None else limit
    history = [tuple(turn) for turn in (history or [])]
    raw_text, context, _ = fit_context(
        tokenizer, query, history, system, max_window_size, budget, overflow=overflow, chat_format=chat_format
    )
    gc.stop_words_ids = [list(s) for s in (stop_words_ids or [])] + get_stop_words_ids(chat_format, tokenizer)
    input_ids = torch.tensor([context], dtype=torch.long, device=model.device)
    return gc, history, raw_text, context, input_ids


def chat(
    model,
    tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = DEFAULT_SYSTEM,
    append_history: bool = True,
    stop_words_ids: list[list[int]] | None = None,
    generation_config=None,
    images: Sequence[Any] | Mapping[str, Any] | None = None,
    seed: int | None = None,
    keep_last_token: bool = False,
    **kwargs: Any,
) -> tuple[str, History]:
    """Answer ``query`` after ``history``; returns ``(response, new_history)``.

    ``images`` supplies already-loaded images for the ``<img>`` spans (a list in
    span order, or a mapping from the path written in the span to the image);
    without it the paths are opened under ``model.image_policy``. Extra keywords
    override generation fields (``max_new_tokens``, ``do_sample``, ...). The
    given history list is not modified.

    A conversation longer than the model's positions (or ``max_context_tokens``)
    loses its oldest turns (``overflow="drop_oldest"``, the default) or raises
    ``ContextTooLongError`` (``overflow="error"``); turns are dropped whole.
    """
    if "stream" in kwargs:
        raise TypeError("chat() does not stream: use chat_stream()")
    gc, history, raw_text, context, input_ids = _prepare(
        model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
    )
    steps = [t[0] for t in generate_stream(model, input_ids, generation_config=gc, images=images, seed=seed)]
    tokens = context + [int(t) for t in steps]
    response = decode_tokens(
        tokens,
        tokenizer,
        raw_text_len=len(raw_text),
        context_length=len(context),
        chat_format=gc.chat_format,
        errors="replace",
        keep_last_token=keep_last_token,
    )
    if append_history:
        history.append((query, response))
    return response, history


def chat_stream(
    model,
    tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = DEFAULT_SYSTEM,
    stop_words_ids: list[list[int]] | None = None,
    generation_config=None,
    images: Sequence[Any] | Mapping[str, Any] | None = None,
    seed: int | None = None,
    delta: bool = False,
    **kwargs: Any,
) -> Iterator[str]:
    """Stream the response to ``query``: the text so far at each step (as the
    official ``chat_stream``), or only the new text with ``delta=True``.

    Text never ends inside a multi-byte character; the stream ends at
    ``<|im_end|>``, ``<|im_start|>`` or end-of-sequence.
    """
    gc, _, _, _, input_ids = _prepare(
        model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
    )
    enders = {tokenizer.im_start_id, tokenizer.im_end_id, *as_id_list(gc.eos_token_id)}
    detok = IncrementalDetokenizer(
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True, keep_image_special=True, errors="replace")
    )

    def stream() -> Iterator[str]:
        text = ""
        for step in generate_stream(model, input_ids, generation_config=gc, images=images, seed=seed):
            token = int(step[0])
            if token in enders:
                break
            piece = detok.push(token)
            if piece:
                text += piece
                yield piece if delta else text
        rest = detok.finish()
        if rest:
            text += rest
            yield rest if delta else text

    return stream()
