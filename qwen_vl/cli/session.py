"""One conversation run through the engine, turn by turn, as ``model.chat`` builds it.

Each turn's context is ``make_context`` over the (query, response) history with the
system prompt, the stop words are ``<|im_end|>`` / ``<|im_start|>``, and the response
is read back with ``decode_tokens`` (so, as in the official ``chat()``, the last token
is dropped when no stop word ended the answer). ``raw=True`` continues the text itself.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat_format import get_stop_words_ids
from ..context import ContextTooLongError, fit_context
from ..engine import engine as engine_module
from ..engine.engine import Engine
from ..engine.generate import eos_token_ids, window_size
from ..engine.reply_text import HeldBackText, TextSink, read_reply
from ..engine.request import GenerationRequest, RequestHandle
from .annotate import parse_boxes
from .image_store import ImageStore
from .options import GenerationOptions


class GenerationFailed(RuntimeError):
    """The engine reported an error for the request."""


@dataclass
class Answer:
    """One generated answer and what it cost."""

    query: str
    response: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    boxes: list[dict[str, Any]] | None = None
    annotated: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "response": self.response,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "boxes": self.boxes,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
        }
        if self.annotated is not None:
            out["annotated"] = str(self.annotated)
        return out


class _FailedSteps(logging.Handler):
    """Keeps the errors the engine logs (instead of printing their tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.errors.append(f"{type(exc).__name__}: {exc}" if exc is not None else record.getMessage())


class ChatSession:
    """A multi-turn conversation with one model through an ``Engine``.

    ``history`` holds (query, response) pairs exactly as ``model.chat`` returns them.
    """

    def __init__(
        self,
        model,
        tokenizer,
        options: GenerationOptions | None = None,
        store: ImageStore | None = None,
        max_seq_len: int | None = None,
        decode_mode: str = "auto",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options if options is not None else GenerationOptions()
        self.store = store if store is not None else ImageStore()
        gc = model.generation_config
        self.sampling = self.options.sampling(gc)
        self.max_new_tokens = self.options.new_tokens(gc)
        self.max_window_size = window_size(gc)
        self.eos_token_ids = eos_token_ids(gc, tokenizer)
        self.engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=max_seq_len, decode_mode=decode_mode)
        self._failed = _FailedSteps()
        logging.getLogger(engine_module.__name__).addHandler(self._failed)
        self.history: list[tuple[str, str]] = []
        self.pending: list[str] = []  # images attached to the next message

    # ----- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        self.engine.stop()
        logging.getLogger(engine_module.__name__).removeHandler(self._failed)

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- conversation state ------------------------------------------------
    def attach(self, source: str) -> str:
        """Load an image the user named and attach it to the next message."""
        ref = self.store.add_named(source)
        self.pending.append(ref)
        return ref

    def clear(self) -> None:
        """Forget the history and the images (attachments for the next message stay)."""
        self.history = []
        kept = {r: self.store.images[r] for r in self.pending if r in self.store.images}
        self.store.clear()
        self.store.images.update(kept)

    def compose(self, text: str) -> str:
        """The query for ``text`` with the attached images before it (``Picture N: <img>...``)."""
        if not self.pending:
            return text
        return self.tokenizer.from_list_format([{"image": r} for r in self.pending] + [{"text": text}])

    # ----- one turn ------------------------------------------------------------
    def prompt(self, query: str, raw: bool = False) -> tuple[str, list[int], list[list[int]]]:
        """``(raw_text, context_ids, stop_words_ids)`` for ``query`` after the history.

        Raises ContextTooLongError when the query alone does not fit the engine.
        """
        budget = self.engine.max_seq_len - 1  # room for one new token
        if raw:
            ids = self.tokenizer.encode(query)
            if len(ids) > budget:
                raise ContextTooLongError(f"the prompt takes {len(ids)} tokens, over the budget of {budget}")
            return self.tokenizer.decode(ids, errors="replace"), ids, []
        raw_text, context, _ = fit_context(
            self.tokenizer, query, self.history, self.options.system, self.max_window_size, budget
        )
        return raw_text, context, get_stop_words_ids("chatml", self.tokenizer)

    def ask(self, text: str, on_text: TextSink | None = None, raw: bool = False) -> Answer:
        """Answer ``text`` (with any attached images), streaming the reply to ``on_text``.

        Chat turns are added to ``history``; a raw continuation is not. Raises ValueError
        for a refused image or a prompt that does not fit, GenerationFailed if the
        engine fails, and KeyboardInterrupt (after cancelling the request) when interrupted.
        """
        query = self.compose(text)
        self.store.resolve(query)
        raw_text, context, stop_words = self.prompt(query, raw=raw)
        request = GenerationRequest(
            prompt_ids=context,
            sampling=self.sampling,
            max_new_tokens=self.max_new_tokens,
            stop_words_ids=stop_words,
            eos_token_ids=self.eos_token_ids,
            images=self.store.mapping(),
        )
        stream = HeldBackText(on_text)
        handle = self._run(request, stream)
        response = read_reply(self.tokenizer, raw_text, context, handle.token_ids, chat=not raw)
        stream.finish(response)
        self.pending = []
        if not raw:
            self.history.append((query, response))
        reason = handle.finish_reason or ""
        return Answer(query, response, list(handle.token_ids), reason, len(context), boxes=parse_boxes(response))

    def _run(self, request: GenerationRequest, stream: HeldBackText) -> RequestHandle:
        self.engine.start()
        self._failed.errors.clear()
        handle = self.engine.submit(request)
        try:
            for event in self._events(handle):
                stream.feed(event.text)
        except KeyboardInterrupt:
            handle.cancel()
            handle.result(timeout=60)
            raise
        if handle.finish_reason in ("error", "cancelled"):
            raise GenerationFailed(handle.error or f"generation {handle.finish_reason}")
        return handle

    def _events(self, handle: RequestHandle, poll_s: float = 0.5) -> Iterator[Any]:
        """``handle``'s events; raises GenerationFailed if a failed engine step lost the request
        (neither waiting, nor running, nor finished)."""
        while True:
            try:
                yield from handle.stream(timeout=poll_s)
                return
            except queue.Empty:
                running = any(r.handle is handle for r in self.engine.active)
                if self._failed.errors and not handle.finished and not running and self.engine.num_waiting == 0:
                    raise GenerationFailed(f"the engine failed: {self._failed.errors[-1]}") from None
