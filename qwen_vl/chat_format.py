"""Chat prompts in Qwen's ChatML layout, stop words, and reading the reply back from ids.

``make_context`` encodes role names and contents with only the image/grounding tags
allowed as special tokens, so a user typing ``<|im_start|>`` gets plain text, never a
control token. Its ``raw_text`` is NFC-normalised, as the tokenizer normalises what it
encodes, so ``len(raw_text)`` is where the reply starts in the decoded ids.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from typing import Any

from .tokenizer import ENDOFTEXT, IMEND, IMSTART, QWenTokenizer

History = Sequence[tuple[str, str | None]]


def make_context(
    tokenizer: QWenTokenizer,
    query: str,
    history: History | None = None,
    system: str = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """Build ``(raw_text, context_tokens)`` for ``query`` after ``history``.

    ChatML: the system turn, then as many past turns as fit, then the query and the opening of
    the assistant turn. Past turns are added newest first while system + kept turns + the next
    turn stay strictly below ``max_window_size`` tokens (the query itself is not counted); the
    first turn that does not fit ends the history. A ``None`` response leaves that turn open
    (``...<|im_end|>\\n``). ``chat_format="raw"`` is the query alone.
    """
    nfc = functools.partial(unicodedata.normalize, "NFC")
    query, system = nfc(query), nfc(system)
    history = [(nfc(q), None if r is None else nfc(r)) for q, r in history or []]
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise NotImplementedError(f"Unknown chat format {chat_format!r}")

    im_start, im_end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = tokenizer.encode("\n")
    user_safe = set(tokenizer.IMAGE_ST)

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        ids = tokenizer.encode(role, allowed_special=user_safe) + nl
        ids += tokenizer.encode(content, allowed_special=user_safe)
        return f"{role}\n{content}", im_start + ids + im_end

    system_text, system_ids = turn("system", system)

    kept_text: list[str] = []
    kept_ids: list[list[int]] = []
    kept_len = 0
    for past_query, past_response in reversed(history):
        query_text, query_ids = turn("user", past_query)
        if past_response is None:
            chunk_ids = nl + query_ids + nl
            chunk_text = f"\n{IMSTART}{query_text}{IMEND}\n"
        else:
            response_text, response_ids = turn("assistant", past_response)
            chunk_ids = nl + query_ids + nl + response_ids
            chunk_text = f"\n{IMSTART}{query_text}{IMEND}\n{IMSTART}{response_text}{IMEND}"
        if len(system_ids) + kept_len + len(chunk_ids) >= max_window_size:
            break
        kept_text.append(chunk_text)
        kept_ids.append(chunk_ids)
        kept_len += len(chunk_ids)

    raw_text = f"{IMSTART}{system_text}{IMEND}" + "".join(reversed(kept_text))
    raw_text += f"\n{IMSTART}user\n{query}{IMEND}\n{IMSTART}assistant\n"
    tokens = list(system_ids)
    for chunk_ids in reversed(kept_ids):
        tokens += chunk_ids
    tokens += nl + turn("user", query)[1] + nl + im_start + tokenizer.encode("assistant") + nl
    return raw_text, tokens


def typed_image_tag(tokenizer: QWenTokenizer, text: str) -> str | None:
    """The first of the tokenizer's image tags (``<img>``, ``</img>``, ``<imgpad>``) found in
    typed ``text``, or None: apps that take pictures separately refuse such text."""
    tags = (tokenizer.image_start_tag, tokenizer.image_end_tag, tokenizer.image_pad_tag)
    return next((tag for tag in tags if tag in text), None)


def get_stop_words_ids(chat_format: str, tokenizer: QWenTokenizer) -> list[list[int]]:
    """Id sequences that end a reply: ``<|im_end|>``/``<|im_start|>`` (chatml), ``Human:``/eod (raw)."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise NotImplementedError(f"Unknown chat format {chat_format!r}")


def decode_tokens(
    tokens: Any,
    tokenizer: QWenTokenizer,
    raw_text_len: int,
    context_length: int,
    chat_format: str,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
    *,
    keep_last_token: bool = False,
) -> str | tuple[str, str]:
    """Reply text of a generated sequence ``tokens`` (prompt ids followed by new ids).

    chatml: the text up to the first ``<|im_start|>``/``<|im_end|>`` at or after
    ``context_length``, minus the first ``raw_text_len`` characters, stripped. When neither
    appears, the default drops the last token (the reference's behaviour, which also drops a
    real last word when generation stopped on length); ``keep_last_token=True`` keeps it unless
    it is ``<|endoftext|>``.

    raw: the text after ``raw_text_len`` characters with every ``<|endoftext|>`` removed, stripped.

    ``return_end_reason=True`` returns ``(text, reason)``, reason being ``"Gen length N"`` or
    ``"Gen '<|im_end|>'"``-style.
    """
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    tokens = list(tokens)

    if chat_format == "chatml":
        text, end_reason = _chatml_reply(tokens, tokenizer, raw_text_len, context_length, errors, keep_last_token)
        if verbose:
            print("\nRaw Generate w/o EOD:", tokenizer.decode(tokens, errors=errors)[raw_text_len:])
            print("\nRaw Generate:", text)
            print("\nEnd Reason:", end_reason)
        text = text.strip()
    elif chat_format == "raw":
        text = tokenizer.decode(tokens, errors=errors)[raw_text_len:]
        if verbose:
            print("\nRaw Generate: ", text)
        end_reason = f"Gen length {len(tokens)}"
        text = text.replace(ENDOFTEXT, "").strip()
        if verbose:
            print("\nEnd Reason:", end_reason)
    else:
        raise NotImplementedError(f"Unknown chat format {chat_format!r}")

    if verbose:
        print("\nGenerate:", text)
    return (text, end_reason) if return_end_reason else text


def _chatml_reply(
    tokens: list[int],
    tokenizer: QWenTokenizer,
    raw_text_len: int,
    context_length: int,
    errors: str,
    keep_last_token: bool,
) -> tuple[str, str]:
    enders = (tokenizer.im_start_id, tokenizer.im_end_id)
    end_reason = f"Gen length {len(tokens)}"
    stop = next((k for k in range(context_length, len(tokens)) if tokens[k] in enders), None)
    if stop is not None:
        end_reason = f"Gen {tokenizer.decode([tokens[stop]])!r}"
    elif len(tokens) <= context_length:
        stop = context_length
    elif keep_last_token:
        stop = len(tokens) - 1 if tokens[-1] == tokenizer.eod_id else len(tokens)
    else:
        stop = len(tokens) - 1
    return tokenizer.decode(tokens[:stop], errors=errors)[raw_text_len:], end_reason
