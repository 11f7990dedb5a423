"""Token ids and labels of a conversation, laid out exactly as ``chat()`` lays out its context.

For turns (q1, a1), ..., (qn, an) and system prompt s the ids are::

    <|im_start|>system\\n{s}<|im_end|>
    \\n<|im_start|>user\\n{q1}<|im_end|>\\n<|im_start|>assistant\\n{a1}<|im_end|>
    ...
    \\n<|im_start|>user\\n{qn}<|im_end|>\\n<|im_start|>assistant\\n{an}<|im_end|>

so the ids before ``{an}`` are ``make_context(tokenizer, qn, history=[(q1, a1), ...], system=s)[1]``.
The sequence ends at the last ``<|im_end|>``: no newline follows it. Labels are -100 everywhere
except each assistant content and the ``<|im_end|>`` closing it. Every text is encoded with only
the image and grounding tags allowed as special tokens, so no text can produce a control token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..tokenizer import QWenTokenizer

if TYPE_CHECKING:
    from .regions import LookTarget

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("drop", "fail", "truncate")


class TurnEncodingError(ValueError):
    """The tokenizer refused the text of turn ``turn`` (index into the conversation's turns)."""

    def __init__(self, turn: int, message: str) -> None:
        super().__init__(message)
        self.turn = turn


@dataclass(frozen=True)
class Encoded:
    """Ids and labels of one conversation; ``turn_ends[k]`` is the length up to and including
    the ``<|im_end|>`` of assistant turn k (the places where it may be cut)."""

    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def cut(self, pairs: int) -> Encoded:
        """The first ``pairs`` user/assistant pairs only."""
        end = self.turn_ends[pairs - 1]
        return Encoded(self.input_ids[:end], self.labels[:end], self.turn_ends[:pairs])


def encode_conversation(tokenizer: QWenTokenizer, pairs: Sequence[tuple[str, str]], system: str) -> Encoded:
    """Ids and labels of ``pairs`` ((user, assistant) texts) after the ``system`` prompt.

    Raises ``TurnEncodingError`` naming the turn whose text the tokenizer refuses
    (for example an image path longer than the ``<img>`` span).
    """
    safe = set(tokenizer.IMAGE_ST)
    nl = tokenizer.encode("\n")
    im_start, im_end = tokenizer.im_start_id, tokenizer.im_end_id

    def text(value: str, turn: int) -> list[int]:
        try:
            return tokenizer.encode(value, allowed_special=safe)
        except (ValueError, TypeError) as exc:
            raise TurnEncodingError(turn, str(exc)) from None

    def header(role: str) -> list[int]:
        return [im_start, *tokenizer.encode(role, allowed_special=safe), *nl]

    ids = header("system") + text(system, -1) + [im_end]
    labels = [IGNORE_INDEX] * len(ids)
    turn_ends: list[int] = []
    for k, (query, answer) in enumerate(pairs):
        prompt = nl + header("user") + text(query, 2 * k) + [im_end] + nl + header("assistant")
        reply = text(answer, 2 * k + 1) + [im_end]
        ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
        turn_ends.append(len(ids))
    return Encoded(ids, labels, turn_ends)


def fit_length(encoded: Encoded, max_length: int, truncation: str) -> Encoded | None:
    """``encoded`` if it fits in ``max_length`` ids; else, with ``truncation="truncate"``, its
    longest prefix of whole pairs that fits; else ``None`` (the caller drops or fails the record).

    Cuts fall only after an assistant's ``<|im_end|>``, so no ``<img>``, ``<ref>`` or ``<box>``
    span is ever split.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, got {truncation!r}")
    if len(encoded) <= max_length:
        return encoded
    if truncation != "truncate":
        return None
    fitting = sum(1 for end in encoded.turn_ends if end <= max_length)
    return encoded.cut(fitting) if fitting else None


@dataclass(frozen=True)
class Example:
    """A validated record ready for training: ids, labels and the images of its spans."""

    record_id: str | int
    file: str
    line: int | None
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,)
    image_paths: tuple[str, ...]  # resolved, in span order
    image_root: str
    look: tuple[LookTarget, ...] = ()  # from the answers' regions (finetune.regions)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_trainable(self) -> int:
        """Positions whose label is trained (assistant content and its ``<|im_end|>``)."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)
