"""The engine: continuous batching over one preallocated KV cache.

Requests wait in a queue; at every step the engine admits as many as there are
free rows (one batched prefill for all of them, left-padded), then runs one decode
step for every running request, each with its own sampling parameters, seed, stop
words, stop strings and limits. Finished, cancelled or failed requests leave
between steps and the remaining rows are compacted, so a decode step always works
on rows ``[0, n)`` of the cache.

Front ends (chat, CLI, server, demo, evaluation) submit ``GenerationRequest``s and
read ``RequestHandle``s; the engine sees token ids and image tensors only.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..images import image_transform, load_image
from ..model.image_spans import find_image_spans
from ..model.rotary import ntk_alpha_for_length
from .decode_step import DecodeStep
from .detokenize import IncrementalDetokenizer
from .image_cache import ImageFeatureCache
from .kv_cache import KVCache
from .prefix_store import PrefixStore
from .request import GenerationRequest, RequestHandle, StreamEvent
from .sampling import select_next_tokens
from .stopping import StopStringMatcher, force_eos_after_stop_words

log = logging.getLogger(__name__)


@dataclass
class _Running:
    handle: RequestHandle
    max_new: int
    pixels: list[torch.Tensor]
    ids: list[int] = field(default_factory=list)
    generated: int = 0
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    matcher: StopStringMatcher | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    """Serve generation requests for one model with continuous batching.

    ``max_batch_size`` rows of ``max_seq_len`` slots are allocated once (KV memory
    = 2 x layers x rows x slots x hidden x dtype size). With a ``tokenizer`` the
    handles also receive text (special tokens skipped, except the grounding tags
    ``<ref>``, ``<box>``, ``<quad>`` that the official ``chat()`` keeps) and stop strings apply.
    The keys/values of up to ``reuse_prefixes`` finished requests are kept, so a
    conversation's next turn prefills only its new tokens. ``decode_mode``
    ("auto", "eager", "compile") chooses how decode steps run (``DecodeStep``).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        image_cache_size: int = 64,
        reuse_prefixes: int = 4,
        decode_mode: str = "auto",
    ) -> None:
        cfg = model.config
        self.model = model.eval()
        self.tokenizer = tokenizer
        limit = cfg.max_position_embeddings
        self.max_seq_len = min(max_seq_len or limit, limit)
        self.device = model.lm_head.weight.device
        self.cache = KVCache(
            cfg.num_hidden_layers, max_batch_size, cfg.num_attention_heads, cfg.head_dim,
            self.max_seq_len, dtype=model.lm_head.weight.dtype, device=self.device,
        )  # fmt: skip
        self.decode_step = DecodeStep(model, self.cache, decode_mode)
        if model.image_cache is None:
            model.image_cache = ImageFeatureCache(image_cache_size)
        self.image_cache: ImageFeatureCache = model.image_cache
        self.prefix_store = PrefixStore(capacity=reuse_prefixes)
        self.active: list[_Running] = []
        self._waiting: deque[RequestHandle] = deque()
        self._admitting: list[_Running] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def max_batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ----- submitting ------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; returns its handle at once."""
        request.validate()
        handle = RequestHandle(request)
        with self._lock:
            self._waiting.append(handle)
        self._wakeup.set()
        return handle

    def generate(self, requests: Iterable[GenerationRequest]) -> list[RequestHandle]:
        """Run ``requests`` to completion (in this thread unless the loop runs) and return their handles."""
        handles = [self.submit(r) for r in requests]
        if self._thread is None:
            self.run_until_idle()
        for h in handles:
            h.result()
        return handles

    def run_until_idle(self) -> None:
        """Step until nothing waits or runs (not while the background loop runs)."""
        if self._thread is not None:
            raise RuntimeError("the engine loop runs in the background: wait on the handles instead")
        while self.step():
            pass

    # ----- background loop -------------------------------------------------
    def start(self) -> None:
        """Run the engine loop in a background thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="qwen-vl-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background loop (running requests stay where they are)."""
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                self._wakeup.wait(0.05)
                self._wakeup.clear()

    # ----- one step ----------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """Admit waiting requests, decode one token for every running one; False if idle."""
        try:
            self._retire_cancelled()
            self._admit()
            self._retire()  # a first token may already end a request
            if self.active:
                self._decode()
            self._retire()
        except Exception as e:  # noqa: BLE001 - every running request must learn about it
            log.exception("engine step failed")
            admitting, self._admitting = self._admitting, []
            for r in [*self.active, *admitting]:
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")
            self._retire()
            for row in range(len(self.active), self.max_batch_size):
                self.cache.reset_row(row)
        with self._lock:
            return bool(self.active or self._waiting)

    def _retire_cancelled(self) -> None:
        """Finish cancelled requests, running or still waiting (a waiting one holds its images)."""
        for r in self.active:
            if r.handle.cancelled and not r.handle.finished:
                self._finish(r, "cancelled")
        self._retire()
        with self._lock:
            gone = [h for h in self._waiting if h.cancelled]
            if gone:
                self._waiting = deque(h for h in self._waiting if not h.cancelled)
        for handle in gone:
            self._finish_handle(handle, "cancelled")

    def _admit(self) -> list[_Running]:
        new: list[_Running] = []
        while len(self.active) + len(new) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
            running = self._prepare(handle)
            if running is not None:
                new.append(running)
        if not new:
            return []
        self._admitting = new  # finished with an error by step() if a prefill fails
        fresh = []
        for r in new:
            if not self._prefill_reusing(r):
                fresh.append(r)
        if fresh:
            self._prefill(fresh)
        self._admitting = []
        return new

    def _prefill(self, new: list[_Running]) -> None:
        """One left-padded forward for requests that start from an empty row."""
        start = len(self.active)
        for row in range(start, start + len(new)):
            self.cache.reset_row(row)
        T = max(len(r.request.prompt_ids) for r in new)
        ids = torch.zeros(len(new), T, dtype=torch.long)
        mask = torch.zeros(len(new), T, dtype=torch.bool)
        for i, r in enumerate(new):
            n = len(r.request.prompt_ids)
            ids[i, T - n :] = torch.tensor(r.request.prompt_ids)
            mask[i, T - n :] = True
        pixels = [p for r in new for p in r.pixels]
        out = self.model(
            ids.to(self.device),
            attention_mask=None if bool(mask.all()) else mask.to(self.device),
            images=pixels or None,
            kv_cache=self.cache.rows(start, start + len(new)),
            logits_to_keep=1,
        )
        self.active.extend(new)
        self._choose(new, out.logits[:, -1])

    def _prefill_reusing(self, r: _Running) -> bool:
        """Prefill ``r`` on top of a stored earlier turn, if one matches; False otherwise."""
        if len(self.prefix_store) == 0:
            return False
        cfg = self.model.config
        prompt = r.request.prompt_ids
        ids = torch.tensor([prompt])
        spans = find_image_spans(ids, cfg.image_start_id, cfg.num_image_queries)
        alpha = ntk_alpha_for_length(len(prompt), cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
        found = self.prefix_store.match(prompt, spans, alpha)
        if found is None:
            return False
        entry, p = found
        row = len(self.active)
        self.prefix_store.restore(self.cache, row, entry, p)
        later = [i for i, s in enumerate(spans) if s.start >= p]
        pixels = [r.pixels[i] for i in later]
        out = self.model(
            ids[:, p:].to(self.device),
            images=pixels or None,
            kv_cache=self.cache.rows(row, row + 1),
            logits_to_keep=1,
        )
        r.handle.reused_tokens = p
        self.active.append(r)
        self._choose([r], out.logits[:, -1])
        return True

    def _prepare(self, handle: RequestHandle) -> _Running | None:
        """Check limits and load images for one request; finish it with an error if it cannot run."""
        request = handle.request
        n = len(request.prompt_ids)
        if handle.cancelled:
            self._finish_handle(handle, "cancelled")
            return None
        if n >= self.max_seq_len:
            self._finish_handle(
                handle, "error", error=f"prompt of {n} tokens does not fit the engine's {self.max_seq_len} positions"
            )
            return None
        try:
            pixels = self._load_pixels(request)
        except (ValueError, OSError) as e:
            self._finish_handle(handle, "error", error=str(e))
            return None
        running = _Running(handle=handle, max_new=min(request.max_new_tokens, self.max_seq_len - n), pixels=pixels)
        running.ids = list(request.prompt_ids)
        if request.sampling.do_sample and request.sampling.seed is not None:
            running.generator = torch.Generator(device=self.device)
            running.generator.manual_seed(request.sampling.seed)
        if self.tokenizer is not None:
            tok = self.tokenizer
            running.detok = IncrementalDetokenizer(
                lambda ids: tok.decode(ids, skip_special_tokens=True, keep_image_special=True, errors="replace")
            )
        if request.stop_strings:
            running.matcher = StopStringMatcher(request.stop_strings)
        return running

    def _load_pixels(self, request: GenerationRequest) -> list[torch.Tensor]:
        ids = torch.tensor([request.prompt_ids])
        cfg = self.model.config
        spans = find_image_spans(ids, cfg.image_start_id, cfg.num_image_queries)
        if not spans:
            return []
        size = int(cfg.visual["image_size"])
        pixels = []
        for source in self.model.span_sources(ids, spans, request.images):
            if isinstance(source, torch.Tensor):
                pixels.append(source)
            else:
                pixels.append(image_transform(load_image(source, self.model.image_policy), size))
        return pixels

    def _decode(self) -> None:
        logits = self.decode_step([r.ids[-1] for r in self.active])  # (n, vocab)
        self._choose(self.active, logits)

    def _choose(self, runs: list[_Running], logits: torch.Tensor) -> None:
        """Pick the next token of each of ``runs`` from its logits row (B, V)."""
        scores = logits.float()
        self._force_eos_after_stop_words(runs, scores)
        prev, prev_mask = None, None
        if any(r.request.sampling.repetition_penalty != 1.0 for r in runs):
            L = max(len(r.ids) for r in runs)
            prev = torch.zeros(len(runs), L, dtype=torch.long)
            prev_mask = torch.zeros(len(runs), L, dtype=torch.bool)
            for i, r in enumerate(runs):
                prev[i, L - len(r.ids) :] = torch.tensor(r.ids)
                prev_mask[i, L - len(r.ids) :] = True
            prev, prev_mask = prev.to(self.device), prev_mask.to(self.device)
        tokens = select_next_tokens(
            scores, prev, prev_mask, [r.request.sampling for r in runs], [r.generator for r in runs]
        ).tolist()
        for r, token in zip(runs, tokens):
            self._append(r, int(token))

    def _force_eos_after_stop_words(self, runs: list[_Running], scores: torch.Tensor) -> None:
        """Rows whose ids end with one of their stop words must emit end-of-sequence next."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(runs):
            if r.request.stop_words_ids and r.request.eos_token_ids:
                key = (tuple(map(tuple, r.request.stop_words_ids)), r.request.eos_token_ids[0])
                groups.setdefault(key, []).append(i)
        for (stop_words, eos), members in groups.items():
            width = max(map(len, stop_words))
            tails = [runs[i].ids[-width:] for i in members]
            ids = torch.zeros(len(members), width, dtype=torch.long)
            valid = torch.zeros(len(members), width, dtype=torch.bool)
            for row, tail in enumerate(tails):  # right-aligned last tokens
                ids[row, width - len(tail) :] = torch.tensor(tail)
                valid[row, width - len(tail) :] = True
            index = torch.tensor(members, device=scores.device)
            sub = scores[index]  # (G, V)
            force_eos_after_stop_words(sub, ids.to(scores.device), valid.to(scores.device), stop_words, eos)
            scores[index] = sub

    def _append(self, r: _Running, token: int) -> None:
        r.ids.append(token)
        r.generated += 1
        reason = None
        text = ""
        if token in r.request.eos_token_ids:
            reason = "stop"
            text = r.detok.finish() if r.detok else ""
        elif r.detok is not None:
            text = r.detok.push(token)
        if reason is None and r.generated >= r.max_new:
            reason = "length"
            if r.detok is not None:
                text += r.detok.finish()
        if r.matcher is not None:
            text, stopped = r.matcher.feed(text)
            if stopped:
                reason = "stop"
            elif reason is not None:
                text += r.matcher.flush()
        r.handle.token_ids.append(token)
        r.handle.text += text
        r.handle.finish_reason = reason
        r.handle._emit(StreamEvent([token], text, finished=reason is not None, finish_reason=reason))

    def _finish(self, r: _Running, reason: str, error: str | None = None) -> None:
        if not r.handle.finished:
            self._finish_handle(r.handle, reason, error)

    @staticmethod
    def _finish_handle(handle: RequestHandle, reason: str, error: str | None = None) -> None:
        handle.finish_reason = reason
        handle.error = error
        handle._emit(StreamEvent([], "", finished=True, finish_reason=reason))

    def _retire(self) -> None:
        """Drop finished requests and compact the survivors into rows [0, n)."""
        if not any(r.handle.finished for r in self.active):
            return
        old_n = len(self.active)
        for row, r in enumerate(self.active):
            if r.handle.finish_reason in ("stop", "length"):
                self.prefix_store.save(self.cache, row, r.ids)
        keep = [(row, r) for row, r in enumerate(self.active) if not r.handle.finished]
        for new_row, (old_row, _) in enumerate(keep):
            if new_row != old_row:
                self.cache.move_row(old_row, new_row)
        for row in range(len(keep), old_n):
            self.cache.reset_row(row)
        self.active = [r for _, r in keep]
