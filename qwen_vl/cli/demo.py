"""``qwen-vl demo``: the Gradio web demo (``qwen_vl.demo``) on the shared engine.

Loads the model once, runs one continuous-batching engine for every browser session,
keeps uploads in a temporary folder it removes at exit (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import time
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from .errors import CliError
from .loading import check_model_dir, load_model, load_tokenizer
from .options import GenerationOptions, ModelOptions, add_generation_flags, add_model_flags, generation_options
from .options import model_options as read_model_options

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
GRADIO_INSTALL = "pip install 'gradio>=6,<7'"


def gradio_ui() -> ModuleType:
    """``qwen_vl.demo.ui``, or CliError saying how to install gradio."""
    try:
        from ..demo import ui
    except ImportError as e:
        raise CliError(f"the web demo needs gradio ({e}); install it with: {GRADIO_INSTALL}") from None
    return ui


def build_demo_app(
    model_opts: ModelOptions,
    options: GenerationOptions | None = None,
    limits: Any = None,
    max_batch_size: int = 4,
    upload_parent: str | Path | None = None,
) -> tuple[Any, Any]:
    """Load the model and return ``(blocks, service)``, not launched: a ``gr.Blocks`` and its
    ``DemoService`` (whose ``folder`` is the app's upload folder). ``limits``: ``DemoLimits``."""
    from ..demo import DemoLimits, DemoService, UploadFolder

    path = check_model_dir(model_opts.model_dir)
    if max_batch_size < 1:
        raise CliError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    try:
        limits = (limits or DemoLimits()).validate()
    except ValueError as e:
        raise CliError(str(e)) from None
    if upload_parent is not None and not Path(upload_parent).is_dir():
        raise CliError(f"--upload-parent {upload_parent}: no such folder")
    if importlib.util.find_spec("gradio") is None:
        raise CliError(f"the web demo needs gradio; install it with: {GRADIO_INSTALL}")
    tokenizer = load_tokenizer(path)
    model = load_model(model_opts)
    name = str(model_opts.model_dir) if str(model_opts.model_dir) == "demo" else path.name
    # Active before gradio is imported, so that the folders gradio names at import lie in it too.
    folder = UploadFolder(limits, upload_parent).activate()
    try:
        ui = gradio_ui()
        service = DemoService(
            model, tokenizer, folder, options, model_name=name, max_batch_size=max_batch_size,
            max_seq_len=model_opts.max_seq_len, decode_mode=model_opts.decode_mode,
        )  # fmt: skip
        return ui.build_demo(service), service
    except BaseException:
        folder.close()
        raise


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Serve the demo until Ctrl-C or SIGTERM, then remove its upload folder; returns the exit code."""
    from ..demo import DemoLimits

    limits = DemoLimits(
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_text_chars=args.max_text_chars,
        max_new_tokens=args.max_tokens,
        max_queue=args.max_queue,
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up as Ctrl-C does
    try:
        blocks, service = build_demo_app(
            read_model_options(args), generation_options(args), limits, args.max_batch_size, args.upload_parent
        )
    except BaseException:
        signal.signal(signal.SIGTERM, previous)
        raise
    try:
        url = gradio_ui().launch(blocks, service, args.host, args.port)
        if args.host not in LOCAL_HOSTS:
            print(f"qwen-vl: warning: the demo has no login; anyone reaching {args.host} can use it", file=sys.stderr)
        print(f"qwen-vl: demo of {service.model_name!r} on {url} (uploads in {service.folder.root})",
              file=sys.stderr, flush=True)  # fmt: skip
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("qwen-vl: demo stopped", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        blocks.close()
        service.stop()
        service.folder.close()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="web demo (Gradio): chat about uploaded pictures, boxes drawn",
        description="A Gradio web app: upload pictures, chat with streamed answers, see grounded boxes drawn; "
        "many users share one engine. Generation flags set the settings shown at start.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-batch-size", type=int, default=4, help="answers generated together (default 4)")
    p.add_argument("--upload-parent", default=None, metavar="DIR",
                   help="where the app's temporary upload folder is made (default: the system's temp folder)")  # fmt: skip
    add_model_flags(p)
    add_generation_flags(p)
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-images", type=int, default=8, help="pictures in one conversation (default 8)")
    limits.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="bytes per uploaded file")
    limits.add_argument("--max-image-pixels", type=int, default=16_000_000, help="width x height per picture")
    limits.add_argument("--max-text-chars", type=int, default=4000, help="characters per message (default 4000)")
    limits.add_argument("--max-tokens", type=int, default=2048, help="largest 'max new tokens' a user may pick")
    limits.add_argument("--max-queue", type=int, default=64, help="requests waiting before the queue is full")
    p.set_defaults(run=run)
