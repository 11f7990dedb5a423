"""``/v1/chat/completions`` and ``/v1/completions``: request body -> engine requests -> OpenAI answer.

An answer is read the way ``chat()`` reads it (``decode_tokens``: cut at the first
ChatML stop word; when the length limit ended it, the last token is dropped), so a
greedy answer equals ``model.chat()``'s for the same conversation. Streams hold each
piece back by one event, so they never show a token the final answer drops; their
pieces join into exactly the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..cli.annotate import parse_boxes
from ..engine.reply_text import HeldBackText, read_reply
from ..engine.request import GenerationRequest, RequestHandle
from ..images import image_transform
from .errors import APIError, invalid
from .image_parts import load_parts
from .messages import ImagePart, parse_messages, refuse_image_tags, write_queries
from .params import GenerationFields, generation_fields
from .service import Disconnected, EngineService, Prompt


@dataclass
class Job:
    """One accepted request: its prompt, its fields and its engine handles (one per choice)."""

    kind: str  # "chat" or "text"
    id: str
    prompt: Prompt
    fields: GenerationFields
    handles: list[RequestHandle]
    started: float = field(default_factory=time.monotonic)
    first_token: dict[int, float] = field(default_factory=dict)
    released: bool = False

    def release(self, service: EngineService) -> None:
        """Give the job's places back (cancelling what still runs); once only."""
        if not self.released:
            self.released = True
            service.release(self.handles)


def check_model(service: EngineService, name: str) -> None:
    if name != service.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server has {service.model_name!r}",
                       param="model", code="model_not_found")  # fmt: skip


def _requests(service: EngineService, prompt: Prompt, fields: GenerationFields, images: Any) -> list[GenerationRequest]:
    out = []
    for i in range(fields.n):
        sampling = fields.sampling
        if sampling.do_sample and sampling.seed is not None and i > 0:
            sampling = replace(sampling, seed=sampling.seed + i)  # n seeded choices differ, reproducibly
        out.append(
            GenerationRequest(
                prompt_ids=list(prompt.ids),
                sampling=sampling,
                max_new_tokens=fields.max_tokens,
                stop_words_ids=service.chat_stops if prompt.chat else [],
                stop_strings=list(fields.stop),
                eos_token_ids=list(service.eos_token_ids),
                images=images,
            )
        )
    return out


def _open_images(service: EngineService, parts: list[ImagePart]) -> list[tuple[str, torch.Tensor]]:
    """``(ref, pixels (3, S, S))`` per image part: opened under the policy and resized here,
    off the engine thread, so a queued request holds model-sized pixels."""
    size = int(service.model.config.visual["image_size"])
    return [(ref, image_transform(image, size)) for ref, image in load_parts(parts, service.policy, service.limits)]


async def _accept(service: EngineService, fields: GenerationFields, prepare: Callable[[], tuple[Prompt, Any]]) -> Job:
    """Reserve the request's places, run ``prepare`` (images, tokenising) in a worker thread,
    then queue its choices; the places go back if anything fails before that."""
    service.reserve(fields.n)
    try:
        prompt, images = await asyncio.to_thread(prepare)
        handles = service.submit(_requests(service, prompt, fields, images))
    except BaseException:
        service.unreserve(fields.n)
        raise
    kind, prefix = ("chat", "chatcmpl") if prompt.chat else ("text", "cmpl")
    return Job(kind, f"{prefix}-{uuid.uuid4().hex}", prompt, fields, handles)


async def accept_chat(service: EngineService, body: dict[str, Any]) -> Job:
    """Check a chat body, then open its images, build its context and submit it."""
    fields = generation_fields(body, service.limits, service.generation_config)
    check_model(service, fields.model)
    conv = parse_messages(body.get("messages"), service.tokenizer)

    def prepare() -> tuple[Prompt, Any]:
        opened = _open_images(service, conv.images) if conv.images else []
        query, history = write_queries(conv, service.tokenizer, [ref for ref, _ in opened])
        return service.chat_prompt(query, history, conv.system), dict(opened) or None

    return await _accept(service, fields, prepare)


async def accept_text(service: EngineService, body: dict[str, Any]) -> Job:
    """Check a raw completion body (one string prompt, no ChatML) and submit it."""
    fields = generation_fields(body, service.limits, service.generation_config)
    check_model(service, fields.model)
    text = body.get("prompt")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise invalid("prompt", "must be a string (one prompt per request)", "invalid_type")
    refuse_image_tags(text, service.tokenizer, "prompt", "images go through /v1/chat/completions")
    return await _accept(service, fields, lambda: (service.raw_prompt(text), None))


# ----- reading answers -----------------------------------------------------
def answer_text(service: EngineService, job: Job, handle: RequestHandle) -> str:
    """The answer of one choice, read as ``chat()`` (or, raw, as ``generate --raw``) reads it."""
    ids = handle.token_ids
    if handle.finish_reason == "stop" and job.fields.stop and (not ids or ids[-1] not in service.eos_token_ids):
        return handle.text.strip()  # the engine cut the text before a stop string
    return read_reply(service.tokenizer, job.prompt.raw_text, job.prompt.ids, ids, chat=job.prompt.chat)


def _finish_reason(handle: RequestHandle) -> str:
    if handle.finish_reason == "error":
        raise APIError(500, f"generation failed: {handle.error}", code="generation_failed")
    return handle.finish_reason or "stop"


def _usage(job: Job) -> dict[str, int]:
    prompt = len(job.prompt.ids)
    completion = sum(len(h.token_ids) for h in job.handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _record(service: EngineService, job: Job, index: int) -> None:
    now = time.monotonic()
    first = job.first_token.get(index)
    service.metrics.finished(
        len(job.prompt.ids) if index == 0 else 0,
        len(job.handles[index].token_ids),
        None if first is None else first - job.started,
        now - job.started,
    )


def _choice(service: EngineService, job: Job, index: int) -> dict[str, Any]:
    handle = job.handles[index]
    reason = _finish_reason(handle)
    text = answer_text(service, job, handle)
    if job.kind == "text":
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
    message = {"role": "assistant", "content": text, "boxes": parse_boxes(text)}
    return {"index": index, "message": message, "finish_reason": reason, "logprobs": None}


async def complete(service: EngineService, job: Job, disconnected: Disconnected | None = None) -> dict[str, Any]:
    """Wait for every choice of ``job`` and answer in one object."""
    try:
        async for i, event in service.events(job.handles, disconnected):
            if event.token_ids and i not in job.first_token:
                job.first_token[i] = time.monotonic()
            if event.finished:
                _record(service, job, i)
        choices = [_choice(service, job, i) for i in range(len(job.handles))]
    finally:
        job.release(service)
    return {
        "id": job.id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": service.model_name,
        "choices": choices,
        "usage": _usage(job),
    }


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def stream(service: EngineService, job: Job, disconnected: Disconnected | None = None) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk per choice with its
    ``finish_reason``, the usage chunk if asked, then ``data: [DONE]``."""
    chat = job.kind == "chat"
    head = {"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": service.model_name}  # fmt: skip
    if job.fields.include_usage:
        head["usage"] = None

    def chunk(index: int, text: str | None = None, reason: str | None = None, **extra: Any) -> str:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            body = {"index": index, "delta": {**delta, **extra}, "finish_reason": reason, "logprobs": None}
        else:
            body = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        return _sse({**head, "choices": [body]})

    pieces: list[list[str]] = [[] for _ in job.handles]
    held = [HeldBackText(pieces[i].append) for i in range(len(job.handles))]
    try:
        if chat:
            for i in range(len(job.handles)):
                yield chunk(i, "", role="assistant")
        async for i, event in service.events(job.handles, disconnected):
            if event.token_ids and i not in job.first_token:
                job.first_token[i] = time.monotonic()
            handle = job.handles[i]
            if not event.finished:
                held[i].feed(event.text)
                for text in pieces[i]:
                    yield chunk(i, text)
                pieces[i].clear()
                continue
            _record(service, job, i)
            if handle.finish_reason == "error":
                error = APIError(500, f"generation failed: {handle.error}", code="generation_failed")
                yield _sse(error.body())
                break
            answer = answer_text(service, job, handle)
            held[i].finish(answer)
            for text in pieces[i]:
                yield chunk(i, text)
            pieces[i].clear()
            extra = {"boxes": parse_boxes(answer)} if chat else {}
            yield chunk(i, None, _finish_reason(handle), **extra)
        else:
            if job.fields.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(job)})
        yield _sse("[DONE]")
    finally:
        job.release(service)
