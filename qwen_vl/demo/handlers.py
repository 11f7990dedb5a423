"""The demo's events as plain functions: send a message, regenerate, undo, clear.

They take and give the conversation and ``gr.Chatbot`` messages, and raise DemoError for
bad input; the Gradio layer (``ui.py``) only wires them to components and shows the errors.
Streaming events are generators: each value is the whole chat window at that moment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from .boxes import draw_answer
from .conversation import Conversation
from .errors import DemoError
from .service import DemoService
from .settings import GenerationSettings

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]


def message_parts(message: Any) -> tuple[str, list[str]]:
    """``(text, file paths)`` of a ``gr.MultimodalTextbox`` value (``{"text", "files"}``) or a string."""
    if message is None:
        return "", []
    if isinstance(message, str):
        return message, []
    if not isinstance(message, dict):
        raise DemoError(f"a message must be text or {{'text': ..., 'files': [...]}}, got {type(message).__name__}")
    text = message.get("text") or ""
    if not isinstance(text, str):
        raise DemoError(f"the message text must be a string, got {type(text).__name__}")
    files = []
    for f in message.get("files") or []:
        path = f.get("path") if isinstance(f, dict) else f
        if not isinstance(path, str) or not path:
            raise DemoError("each attached file must be an uploaded file")
        files.append(path)
    return text, files


class ChatHandlers:
    """The events of one demo, over its shared ``DemoService``."""

    def __init__(self, service: DemoService) -> None:
        self.service = service

    def settings(self, temperature: Any, top_p: Any, max_new_tokens: Any, seed: Any) -> GenerationSettings:
        return GenerationSettings.checked(temperature, top_p, max_new_tokens, seed, self.service.limits.max_new_tokens)

    def chat(
        self,
        message: Any,
        conversation: Conversation | None,
        temperature: Any,
        top_p: Any,
        max_new_tokens: Any,
        seed: Any,
    ) -> Iterator[tuple[Messages, Conversation]]:
        """Add ``message`` (text and uploaded pictures) to the conversation and stream its answer."""
        settings = self.settings(temperature, top_p, max_new_tokens, seed)
        conversation = conversation if conversation is not None else Conversation()
        text, files = message_parts(message)
        conversation.turns.append(self.service.new_turn(conversation, text, files))
        yield from self._answer(conversation, settings)

    def regenerate(
        self, conversation: Conversation | None, temperature: Any, top_p: Any, max_new_tokens: Any, seed: Any
    ) -> Iterator[tuple[Messages, Conversation]]:
        """Answer the last message again (with the settings now shown)."""
        settings = self.settings(temperature, top_p, max_new_tokens, seed)
        if conversation is None or not conversation.turns:
            raise DemoError("there is no message to answer again yet")
        yield from self._answer(conversation, settings)

    def undo(self, conversation: Conversation | None) -> tuple[Messages, Conversation, dict[str, Any] | None]:
        """Remove the last message and its answer; the message goes back into the input box."""
        conversation = conversation if conversation is not None else Conversation()
        turn = conversation.undo()
        restored = None if turn is None else {"text": turn.text, "files": [str(p.path) for p in turn.pictures]}
        return conversation.messages(), conversation, restored

    def clear(self) -> tuple[Messages, Conversation, None]:
        """Start a new conversation."""
        return [], Conversation(), None

    def _answer(
        self, conversation: Conversation, settings: GenerationSettings
    ) -> Iterator[tuple[Messages, Conversation]]:
        """Stream the last turn's answer, then draw its boxes. A turn whose answer fails is
        removed (the window shows the conversation without it) and the error raised."""
        turn = conversation.turns[-1]
        turn.response, turn.done, turn.annotated = "", False, None
        yield conversation.messages(), conversation
        try:
            for _ in self.service.answer(conversation, settings):
                yield conversation.messages(), conversation
        except DemoError:
            conversation.turns.remove(turn)
            yield conversation.messages(), conversation
            raise
        try:
            turn.annotated = draw_answer(conversation, self.service.folder)
        except (OSError, ValueError) as e:
            log.warning("cannot draw the boxes of an answer: %s", e)
        if turn.annotated is not None:
            yield conversation.messages(), conversation
