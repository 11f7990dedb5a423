"""The server's side of the engine: prompts built as ``chat()`` builds them, requests
submitted under the queue bound, and handles awaited without blocking the event loop.

The engine runs in its own thread. One task on the event loop polls every open handle
(``stream(timeout=0)`` hands over whatever events are ready) and wakes the requests
that got events, so neither a thread nor a polling loop is kept per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..chat_format import get_stop_words_ids
from ..context import ContextTooLongError, fit_context
from ..engine.engine import Engine
from ..engine.generate import eos_token_ids, window_size
from ..engine.request import GenerationRequest, RequestHandle, StreamEvent
from .errors import APIError, invalid
from .limits import ImageAccess, ServerLimits
from .metrics import Metrics

Disconnected = Callable[[], Awaitable[bool]]


class ClientGone(Exception):
    """The client closed the connection; its generations were cancelled."""


@dataclass
class Prompt:
    """A tokenised prompt and how to read its answer."""

    raw_text: str
    ids: list[int]
    chat: bool  # ChatML turn (stop words, chat() reading) or raw continuation


def drain(handle: RequestHandle) -> list[StreamEvent]:
    """The events ``handle`` has ready now, without waiting."""
    events: list[StreamEvent] = []
    try:
        for event in handle.stream(timeout=0):
            events.append(event)
    except queue.Empty:
        pass
    return events


class EngineService:
    """One model behind one continuous-batching engine, shared by every request."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        limits: ServerLimits | None = None,
        access: ImageAccess | None = None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        decode_mode: str = "auto",
        poll_s: float = 0.005,
    ) -> None:
        self.limits = (limits or ServerLimits()).validate()
        self.access = access or ImageAccess()
        self.policy = self.access.policy(self.limits)
        model.image_policy = self.policy  # spans never open anything the policy refuses
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                             decode_mode=decode_mode)  # fmt: skip
        gc = model.generation_config
        self.generation_config = gc
        self.max_window_size = window_size(gc)
        self.eos_token_ids = eos_token_ids(gc, tokenizer)
        self.chat_stops = get_stop_words_ids("chatml", tokenizer)
        self.metrics = Metrics()
        self.in_flight = 0
        self.draining = False
        self.poll_s = poll_s
        self._watched: dict[RequestHandle, tuple[list[StreamEvent], asyncio.Event]] = {}
        self._pump: asyncio.Task | None = None

    # ----- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop(timeout=10)

    # ----- prompts -------------------------------------------------------------
    @property
    def prompt_budget(self) -> int:
        """Most prompt tokens a request may take (one position stays for the answer)."""
        budget = self.engine.max_seq_len - 1
        if self.limits.max_prompt_tokens is not None:
            budget = min(budget, self.limits.max_prompt_tokens)
        return budget

    def chat_prompt(self, query: str, history: list[tuple[str, str]], system: str) -> Prompt:
        """The ChatML context ``chat()`` builds; 400 when it does not fit (no turn is dropped)."""
        try:
            raw_text, ids, _ = fit_context(
                self.tokenizer, query, history, system, self.max_window_size, self.prompt_budget, overflow="error"
            )
        except ContextTooLongError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="context_length_exceeded") from None
        return Prompt(raw_text, ids, chat=True)

    def raw_prompt(self, text: str) -> Prompt:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "prompt: is empty", param="prompt", code="invalid_value")
        if len(ids) > self.prompt_budget:
            raise APIError(
                400,
                f"prompt: takes {len(ids)} tokens, over the budget of {self.prompt_budget}",
                param="prompt",
                code="context_length_exceeded",
            )
        return Prompt(self.tokenizer.decode(ids, errors="replace"), ids, chat=False)

    # ----- running -------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Requests (choices) that may be in flight at once: engine rows plus queue places."""
        return self.engine.max_batch_size + self.limits.max_queue

    def reserve(self, n: int) -> None:
        """Take ``n`` places before any costly work (images, tokenising): 429 when the
        queue has no room, 503 while draining. Give them back with ``unreserve`` if the
        request fails before ``submit``; after it, ``release`` gives them back."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if n > self.capacity:
            raise invalid("n", f"asks for {n} choices; this server runs at most {self.capacity} at once")
        if self.in_flight + n > self.capacity:
            self.metrics.rejected += 1
            raise APIError(
                429,
                f"the server is busy ({self.in_flight} requests in flight, room for {self.capacity}); retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.in_flight += n

    def unreserve(self, n: int) -> None:
        self.in_flight -= n

    def submit(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue ``requests`` (their places already reserved); all or none are queued."""
        for r in requests:
            r.validate()
        return [self.engine.submit(r) for r in requests]

    def release(self, handles: list[RequestHandle]) -> None:
        """Forget ``handles`` (cancelling any still running)."""
        for h in handles:
            if not h.finished:
                h.cancel()
        self.in_flight -= len(handles)

    async def _poll(self) -> None:
        """Move ready events from the engine's handles to their waiting requests, while any wait."""
        while self._watched:
            for handle, (buffer, ready) in list(self._watched.items()):
                got = drain(handle)
                if got:
                    buffer.extend(got)
                    ready.set()
            await asyncio.sleep(self.poll_s)
        self._pump = None

    async def events(
        self, handles: list[RequestHandle], disconnected: Disconnected | None = None
    ) -> AsyncIterator[tuple[int, StreamEvent]]:
        """``(choice index, event)`` as the engine produces them, until every handle finishes.

        Raises ClientGone (after cancelling) when ``disconnected()`` says the client left.
        """
        ready = asyncio.Event()
        buffers: list[list[StreamEvent]] = [[] for _ in handles]
        for handle, buffer in zip(handles, buffers):
            self._watched[handle] = (buffer, ready)
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._poll())
        pending = set(range(len(handles)))
        checked = time.monotonic()
        try:
            while pending:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ready.wait(), timeout=0.1)
                ready.clear()
                if disconnected is not None and time.monotonic() - checked >= 0.1:
                    checked = time.monotonic()
                    if await disconnected():
                        for h in handles:
                            h.cancel()
                        raise ClientGone()
                for i, buffer in enumerate(buffers):
                    while buffer:
                        event = buffer.pop(0)
                        yield i, event
                        if event.finished:
                            pending.discard(i)
        finally:
            for handle in handles:
                self._watched.pop(handle, None)
