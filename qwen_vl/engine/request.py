"""What one generation request asks for, and what the engine reports back."""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingParams

_ids = itertools.count()


@dataclass
class GenerationRequest:
    """One prompt to continue.

    ``images`` fills the prompt's ``<img>`` spans (list in span order, or a mapping
    from the path written in a span); None opens the spans' own paths under the
    model's image policy. ``stop_words_ids``: after one of these token sequences the
    model is made to emit end-of-sequence (the official chat behaviour).
    ``stop_strings``: generation ends where the text contains one (not included).
    """

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 512
    stop_words_ids: list[list[int]] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=lambda: [151643])
    images: Any = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")

    def validate(self) -> GenerationRequest:
        """Raise ValueError naming the field that is out of range."""
        if not self.prompt_ids:
            raise ValueError(f"{self.request_id}: prompt_ids is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"{self.request_id}: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if any(len(s) == 0 for s in self.stop_words_ids):
            raise ValueError(f"{self.request_id}: stop_words_ids holds an empty sequence")
        if any(s == "" for s in self.stop_strings):
            raise ValueError(f"{self.request_id}: stop_strings holds an empty string")
        self.sampling.validate()
        return self


@dataclass
class StreamEvent:
    """A piece of output: new token ids and the text they completed."""

    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None


class RequestHandle:
    """The caller's side of a submitted request: stream, wait, cancel."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
        self.error: str | None = None
        self.reused_tokens = 0  # prompt tokens whose keys/values came from an earlier turn
        self._events: queue.Queue[StreamEvent] = queue.Queue()
        self._done = threading.Event()
        self._cancel = threading.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step."""
        self._cancel.set()

    def _emit(self, event: StreamEvent) -> None:
        self._events.put(event)
        if event.finished:
            self._done.set()

    def stream(self, timeout: float | None = None):
        """Yield events as they come, until the request finishes."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.finished:
                return

    def result(self, timeout: float | None = None) -> RequestHandle:
        """Wait until finished; returns self (``token_ids``, ``text``, ``finish_reason``)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.request.request_id} did not finish within {timeout} s")
        return self
