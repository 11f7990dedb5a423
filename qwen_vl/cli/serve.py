"""``qwen-vl serve``: the OpenAI-compatible HTTP server (``qwen_vl.server``) under uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .errors import CliError
from .loading import check_model_dir, load_model, load_tokenizer
from .options import ModelOptions, add_model_flags, model_options

API_KEY_ENV = "QWEN_VL_API_KEY"


def build_app(
    model_opts: ModelOptions,
    api_key: str | None = None,
    limits: Any = None,
    access: Any = None,
    max_batch_size: int = 8,
    served_name: str | None = None,
) -> Any:
    """Load the model and return ``(app, service)``; ``limits`` is a ``ServerLimits``,
    ``access`` an ``ImageAccess`` (defaults: ``ServerLimits()``, data URIs only)."""
    from ..server import EngineService, ImageAccess, ServerLimits, create_app

    path = check_model_dir(model_opts.model_dir)
    if max_batch_size < 1:
        raise CliError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    limits = (limits or ServerLimits()).validate()
    access = access or ImageAccess()
    for root in access.allow_roots:
        if not Path(root).expanduser().is_dir():
            raise CliError(f"--allow-root {root}: no such folder")
    tokenizer = load_tokenizer(path)
    model = load_model(model_opts)
    service = EngineService(
        model, tokenizer, served_name or path.name, limits, access,
        max_batch_size=max_batch_size, max_seq_len=model_opts.max_seq_len, decode_mode=model_opts.decode_mode,
    )  # fmt: skip
    return create_app(service, api_key), service


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..server import ImageAccess, ServerLimits

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    limits = ServerLimits(
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_n=args.max_n,
        max_queue=args.max_queue,
    )
    try:
        limits.validate()
    except ValueError as e:
        raise CliError(str(e)) from None
    access = ImageAccess(list(args.allow_root), args.allow_url, list(args.allowed_host))
    app, service = build_app(model_options(args), api_key, limits, access, args.max_batch_size, args.served_model_name)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"qwen-vl: warning: serving on {args.host} without an API key", file=sys.stderr)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM / SIGINT: stop taking requests
            service.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
        timeout_graceful_shutdown=args.drain_timeout,
    )  # fmt: skip
    if not args.quiet:
        print(f"qwen-vl: serving {service.model_name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    _Server(config).run()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, metavar="NAME", help="model id (default: folder name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish running requests on SIGTERM")
    add_model_flags(p)
    images = p.add_argument_group("images in requests (data: URIs are always accepted)")
    images.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                        help="folder local image paths may come from (repeatable; default: no local paths)")  # fmt: skip
    images.add_argument("--allow-url", action="store_true", help="accept http(s) image URLs (public addresses)")
    images.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                        help="only these URL hosts (implies --allow-url)")  # fmt: skip
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    limits.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="encoded bytes per image")
    limits.add_argument("--max-image-pixels", type=int, default=16_000_000, help="width x height per image")
    limits.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024, help="request body (413 past it)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None, help="default: what the KV cache holds")
    limits.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask")
    limits.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")
    limits.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429")
    p.set_defaults(run=serve)
