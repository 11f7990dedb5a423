"""OpenAI chat messages -> the (system, history, query) that ``chat()`` takes.

A conversation is: an optional system (or developer) message first, then user and
assistant messages taking turns, ending with a user message. Each user message
becomes one query written as ``tokenizer.from_list_format`` writes it (``Picture N:
<img>ref</img>`` for its images, in order, then its text), each assistant message
the response of that turn, exactly as ``chat()`` keeps its history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..chat import DEFAULT_SYSTEM
from ..chat_format import typed_image_tag
from .errors import invalid


@dataclass
class ImagePart:
    """An ``image_url`` part: where it is in the request and where it points."""

    param: str  # e.g. messages[1].content[0].image_url
    url: str


@dataclass
class Conversation:
    """A checked conversation; queries hold placeholders ``{image:i}`` for ``images[i]``."""

    system: str
    turns: list[list[dict[str, Any]]]  # per user message: list-format parts
    replies: list[str]  # assistant messages, one fewer than turns
    images: list[ImagePart] = field(default_factory=list)


def refuse_image_tags(text: str, tokenizer, param: str, instead: str) -> None:
    """400 when ``text`` holds the tokenizer's image tags (``<img>``, ``</img>``,
    ``<imgpad>``): images never come from typed text."""
    found = typed_image_tag(tokenizer, text)
    if found:
        raise invalid(param, f"must not contain {found} tags; {instead}")


def _text(value: Any, param: str, tokenizer) -> str:
    if not isinstance(value, str):
        raise invalid(param, f"must be a string, got {type(value).__name__}", "invalid_type")
    refuse_image_tags(value, tokenizer, param, "send images as image_url parts")
    return value


def _parts(content: Any, param: str, tokenizer, images: list[ImagePart], allow_images: bool) -> list[dict[str, Any]]:
    """The list-format parts of one message's content."""
    if isinstance(content, str):
        return [{"text": _text(content, param, tokenizer)}]
    if not isinstance(content, list) or not content:
        raise invalid(param, "must be a string or a non-empty list of content parts", "invalid_type")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise invalid(where, f"must be an object, got {type(part).__name__}", "invalid_type")
        kind = part.get("type")
        if kind == "text":
            parts.append({"text": _text(part.get("text"), f"{where}.text", tokenizer)})
        elif kind == "image_url" and allow_images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise invalid(f"{where}.image_url", "must be an object with a non-empty url string", "invalid_type")
            images.append(ImagePart(f"{where}.image_url", url))
            parts.append({"image": len(images) - 1})
        elif kind == "image_url":
            raise invalid(f"{where}.type", "only user messages may hold images")
        else:
            raise invalid(f"{where}.type", f"must be 'text' or 'image_url', got {kind!r}")
    return parts


def parse_messages(messages: Any, tokenizer) -> Conversation:
    """Check ``messages`` (text checked against ``tokenizer``'s image tags) and split them into system, user turns and assistant replies."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of messages", "invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", f"must be an object, got {type(m).__name__}", "invalid_type")
    system, start = DEFAULT_SYSTEM, 0
    if messages[0].get("role") in ("system", "developer"):
        parts = _parts(messages[0].get("content"), "messages[0].content", tokenizer, [], allow_images=False)
        system, start = "".join(p["text"] for p in parts), 1
    conv = Conversation(system, [], [])
    for i in range(start, len(messages)):
        role = messages[i].get("role")
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            where = "a system message may only come first; " if role in ("system", "developer") else ""
            raise invalid(
                f"messages[{i}].role",
                f"{where}expected {expected!r} (user and assistant messages take turns), got {role!r}",
            )
        param = f"messages[{i}].content"
        if role == "user":
            conv.turns.append(_parts(messages[i].get("content"), param, tokenizer, conv.images, allow_images=True))
        else:
            parts = _parts(messages[i].get("content"), param, tokenizer, [], allow_images=False)
            conv.replies.append("".join(p["text"] for p in parts))
    if len(conv.turns) == len(conv.replies):
        raise invalid(f"messages[{len(messages) - 1}].role", "the last message must be a user message")
    return conv


def write_queries(conv: Conversation, tokenizer, refs: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """``(query, history)`` with image ``i`` written as ``refs[i]``, as ``chat()`` takes them."""
    texts = []
    for parts in conv.turns:
        listed = [{"image": refs[p["image"]]} if "image" in p else p for p in parts]
        texts.append(tokenizer.from_list_format(listed))
    return texts[-1], list(zip(texts[:-1], conv.replies))
