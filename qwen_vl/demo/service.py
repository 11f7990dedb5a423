"""The demo's side of the engine: one model, one continuous-batching engine in its own
thread, shared by every browser session; prompts built as ``model.chat`` builds them.

A turn's context is ``fit_context`` over the conversation (oldest turns dropped whole when
it does not fit, as ``chat()`` does), the stop words are ChatML's, and the answer is read
back with ``decode_tokens``, so a greedy answer equals ``model.chat()``'s for the same
conversation. Streamed text is held back one event (``HeldBackText``): the pieces shown
join into exactly that answer.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

from ..chat_format import get_stop_words_ids, typed_image_tag
from ..cli.options import GenerationOptions
from ..context import ContextTooLongError, fit_context
from ..engine.engine import Engine
from ..engine.generate import eos_token_ids, window_size
from ..engine.reply_text import HeldBackText, read_reply
from ..engine.request import GenerationRequest, RequestHandle, StreamEvent
from ..images import image_transform
from ..server.image_parts import image_ref
from .conversation import Conversation, Picture, Turn
from .errors import DemoError
from .settings import GenerationSettings
from .uploads import UploadFolder


class DemoService:
    """Everything the demo's sessions share: model, tokenizer, engine, upload folder, defaults."""

    def __init__(
        self,
        model,
        tokenizer,
        folder: UploadFolder,
        options: GenerationOptions | None = None,
        model_name: str = "model",
        max_batch_size: int = 4,
        max_seq_len: int | None = None,
        decode_mode: str = "auto",
        poll_s: float = 0.25,
    ) -> None:
        self.folder = folder
        self.limits = folder.limits
        model.image_policy = folder.policy  # an <img> span never opens anything outside the folder
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                             decode_mode=decode_mode)  # fmt: skip
        gc = model.generation_config
        self.options = options if options is not None else GenerationOptions()
        self.base_sampling = self.options.sampling(gc)
        self.defaults = GenerationSettings.defaults(
            self.base_sampling, self.options.new_tokens(gc), self.limits.max_new_tokens
        )
        self.max_window_size = window_size(gc)
        self.eos_token_ids = eos_token_ids(gc, tokenizer)
        self.chat_stops = get_stop_words_ids("chatml", tokenizer)
        self.image_size = int(model.config.visual["image_size"])
        self.poll_s = poll_s
        self.stopped = False

    # ----- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Run the engine's loop in its background thread."""
        self.stopped = False
        self.engine.start()

    def stop(self) -> None:
        """Stop the engine; answers still streaming end with DemoError."""
        self.stopped = True
        self.engine.stop(timeout=10)

    # ----- turns ---------------------------------------------------------------
    def picture(self, path: str | Path) -> Picture:
        """An uploaded file opened under the folder's policy and resized to the model's input
        here, in the caller's thread (never on the engine thread). Raises UploadRefused."""
        image = self.folder.open(path)
        return Picture(image_ref(image), Path(path), Path(path).name, image_transform(image, self.image_size))

    def new_turn(self, conversation: Conversation, text: str, files: list[str]) -> Turn:
        """The next turn of ``conversation`` for a typed ``text`` and uploaded ``files``
        (not added yet); DemoError names what is refused."""
        tok = self.tokenizer
        if not text.strip() and not files:
            raise DemoError("type a message or attach a picture")
        if len(text) > self.limits.max_text_chars:
            raise DemoError(f"the message has {len(text)} characters, at most {self.limits.max_text_chars} allowed")
        found = typed_image_tag(tok, text)
        if found:
            raise DemoError(f"messages must not contain {found} tags; attach pictures with the upload button")
        total = len(conversation.pictures()) + len(files)
        if total > self.limits.max_images:
            raise DemoError(
                f"too many images: the conversation would hold {total}, at most {self.limits.max_images} "
                "allowed (undo or clear to make room)"
            )
        pictures = [self.picture(f) for f in files]
        parts = [{"image": p.ref} for p in pictures] + ([{"text": text}] if text else [])
        return Turn(text, pictures, tok.from_list_format(parts))

    def prompt(self, conversation: Conversation) -> tuple[str, list[int]]:
        """``(raw_text, context_ids)`` of the last turn after the ones before it."""
        budget = self.engine.max_seq_len - 1  # room for one new token
        try:
            raw_text, ids, _ = fit_context(
                self.tokenizer, conversation.turns[-1].query, conversation.history(), self.options.system,
                self.max_window_size, budget,
            )  # fmt: skip
        except ContextTooLongError as e:
            raise DemoError(f"the message does not fit the model: {e}") from None
        return raw_text, ids

    def answer(self, conversation: Conversation, settings: GenerationSettings) -> Iterator[str]:
        """Answer the last turn, yielding its text as it grows; the last value is the exact
        answer, also left in ``turn.response`` (``turn.done`` set). Closing the iterator
        early cancels the request. DemoError if the prompt does not fit or generation fails."""
        turn = conversation.turns[-1]
        raw_text, ids = self.prompt(conversation)
        request = GenerationRequest(
            prompt_ids=ids,
            sampling=settings.sampling(self.base_sampling),
            max_new_tokens=settings.max_new_tokens,
            stop_words_ids=self.chat_stops,
            eos_token_ids=list(self.eos_token_ids),
            images=conversation.images(),  # always a mapping: an <img> span the demo did not write has no picture
        )
        held = HeldBackText(None)  # held.shown: the text that may be shown so far
        turn.response, turn.done, turn.annotated = "", False, None
        handle = self.engine.submit(request)
        try:
            for event in self._events(handle):
                held.feed(event.text)
                if held.shown != turn.response:
                    turn.response = held.shown
                    yield turn.response
            if handle.finish_reason in ("error", "cancelled"):
                raise DemoError(f"generation failed: {handle.error or handle.finish_reason}")
            final = read_reply(self.tokenizer, raw_text, ids, handle.token_ids, chat=True)
            turn.response, turn.done = final, True
            yield final
        finally:
            if not handle.finished:
                handle.cancel()

    def _events(self, handle: RequestHandle) -> Iterator[StreamEvent]:
        """``handle``'s events until it finishes; DemoError if the demo stops meanwhile."""
        while True:
            try:
                yield from handle.stream(timeout=self.poll_s)
                return
            except queue.Empty:
                if self.stopped:
                    raise DemoError("the demo is shutting down") from None
