"""The FastAPI application: routes, API-key check, body parsing and error answers."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from .completions import accept_chat, accept_text, complete, stream
from .errors import APIError
from .service import ClientGone, EngineService

_log = logging.getLogger(__name__)


def _chat_body(model: str) -> dict[str, Any]:
    """The JSON schema of a chat body, published in ``/openapi.json``."""
    return {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "enum": [model]},
            "messages": {"type": "array", "items": {"type": "object"}, "minItems": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "max_tokens": {"type": "integer", "minimum": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
            "seed": {"type": "integer"},
            "n": {"type": "integer", "minimum": 1},
            "stream": {"type": "boolean"},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        },
    }


def _text_body(model: str) -> dict[str, Any]:
    """The JSON schema of a raw completion body."""
    chat = _chat_body(model)
    properties = {k: v for k, v in chat["properties"].items() if k != "messages"}
    return {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {**properties, "prompt": {"type": "string"}},
    }


def _body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class _StatusCounter:
    """ASGI middleware counting answers by HTTP status for /metrics."""

    def __init__(self, app: Any, service: EngineService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.service.metrics.responses[str(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counted)


class _CountedApp(FastAPI):
    """FastAPI with ``_StatusCounter`` outside every other layer, so that the 500s sent by
    Starlette's error middleware (the outermost layer FastAPI builds) are counted too."""

    def __init__(self, service: EngineService, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._counted_service = service

    def build_middleware_stack(self) -> ASGIApp:
        return _StatusCounter(super().build_middleware_stack(), self._counted_service)


def _too_large(size: str, limit: int) -> APIError:
    return APIError(413, f"request body of {size} bytes, at most {limit} allowed", code="body_too_large")


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes: by its declared
    ``Content-Length`` before reading, and by a running total while reading (chunked bodies)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(length, limit)
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > limit:
            raise _too_large(f"more than {limit}", limit)
    return bytes(raw)


def _parse_json(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; 400 ``invalid_json`` for anything else, including numbers
    past Python's integer-digit limit and nesting past its recursion limit."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer over the digit limit
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


class _JobStream(StreamingResponse):
    """Server-sent events that give the job's places back however the response ends
    (also when the client leaves before the first event was produced)."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def create_app(service: EngineService, api_key: str | None = None) -> FastAPI:
    """The server for ``service``; with ``api_key`` every ``/v1`` route needs ``Authorization: Bearer KEY``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.draining = True
        service.stop()

    app = _CountedApp(service, title="qwen-vl", description="OpenAI-compatible Qwen-VL server", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """A 500 that tells the client nothing of the failure; the log has it, with its traceback."""
        _log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal error; see the server log", code="internal_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=code, headers=exc.headers).response()

    def authorise(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def read_body(request: Request) -> dict[str, Any]:
        return _parse_json(await _read_limited(request, service.limits.max_body_bytes))

    async def answer(request: Request, accept: Any) -> Any:
        authorise(request)
        job = await accept(service, await read_body(request))
        if job.fields.stream:
            return _JobStream(stream(service, job, request.is_disconnected), lambda: job.release(service))
        try:
            return await complete(service, job, request.is_disconnected)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it; logged as "client closed request"

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(_chat_body(service.model_name)))
    async def chat_completions(request: Request) -> Any:
        """A chat answer (text and image_url parts), streamed as server-sent events with ``stream: true``."""
        return await answer(request, accept_chat)

    @app.post("/v1/completions", openapi_extra=_body_schema(_text_body(service.model_name)))
    async def completions(request: Request) -> Any:
        """A raw continuation of ``prompt`` (no ChatML), for base models."""
        return await answer(request, accept_text)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorise(request)
        card = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "qwen-vl"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        authorise(request)
        if name != service.model_name:
            raise APIError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "qwen-vl"}

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the server takes requests, 503 while it drains."""
        status = 503 if service.draining else 200
        body = {"status": "draining" if service.draining else "ok", "model": service.model_name,
                "in_flight": service.in_flight}  # fmt: skip
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text: queue depth, running requests, tokens/s, time-to-first-token and latency."""
        engine = service.engine
        text = service.metrics.render(engine.num_waiting, len(engine.active), service.in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
