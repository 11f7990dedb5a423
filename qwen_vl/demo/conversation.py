"""One user's conversation: the turns, their pictures, and how the chat window shows them.

Each turn keeps the query exactly as ``model.chat`` takes it: the message's pictures
written ``Picture N: <img>ref</img>`` (``tokenizer.from_list_format``, numbered per
message, as the OpenAI server writes a user message), then the typed text. ``ref`` is a
name derived from the picture's pixels, so nothing a user types can name a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Picture:
    """An uploaded picture: its prompt reference, its file in the demo's folder, its model input."""

    ref: str  # image-<hash of the pixels>, what the prompt's <img> span holds
    path: Path  # inside the demo's upload folder
    name: str  # the file's own name, for messages
    pixels: torch.Tensor  # (3, S, S) float32, resized to the vision tower's input


@dataclass
class Turn:
    """One message and its answer."""

    text: str  # what the user typed
    pictures: list[Picture]  # attached to this message
    query: str  # the query as chat() takes it
    response: str = ""  # streamed so far; the exact answer once ``done``
    done: bool = False
    annotated: Path | None = None  # the latest picture with this answer's boxes drawn


@dataclass
class Conversation:
    """The turns of one browser session, oldest first."""

    turns: list[Turn] = field(default_factory=list)

    def history(self) -> list[tuple[str, str]]:
        """``(query, response)`` of every turn before the last, as ``chat()`` takes ``history``."""
        return [(t.query, t.response) for t in self.turns[:-1]]

    def images(self) -> dict[str, torch.Tensor]:
        """Reference -> pixels (3, S, S) of every picture, as ``GenerationRequest.images`` takes them."""
        return {p.ref: p.pixels for t in self.turns for p in t.pictures}

    def pictures(self) -> list[Picture]:
        """Every picture of the conversation, oldest first."""
        return [p for t in self.turns for p in t.pictures]

    def undo(self) -> Turn | None:
        """Remove the last turn (message and answer); returns it, or None when there is none."""
        return self.turns.pop() if self.turns else None

    def messages(self) -> list[dict[str, Any]]:
        """The conversation in ``gr.Chatbot``'s message format: pictures then text for the user,
        the answer (exactly, as a text part) then the drawn boxes for the assistant."""
        out: list[dict[str, Any]] = []
        for turn in self.turns:
            content: list[dict[str, Any]] = [{"path": str(p.path), "alt_text": p.name} for p in turn.pictures]
            if turn.text:
                content.append({"type": "text", "text": turn.text})
            out.append({"role": "user", "content": content})
            if turn.response or turn.done:
                reply: list[dict[str, Any]] = [{"type": "text", "text": turn.response}]
                if turn.annotated is not None:
                    reply.append({"path": str(turn.annotated), "alt_text": "the answer's boxes"})
                out.append({"role": "assistant", "content": reply})
        return out
