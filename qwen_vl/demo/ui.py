"""The Gradio app: chat window, message box with picture upload, regenerate / undo / clear,
example messages, generation settings. The one module of ``qwen_vl.demo`` that imports ``gradio``.

Events that generate share one concurrency group as wide as the engine's batch, so that
many sessions are answered together and further ones wait in Gradio's queue (with their
place shown). API names: ``/chat``, ``/regenerate``, ``/undo``, ``/clear``.
"""

from __future__ import annotations

import functools
import html
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from .conversation import Conversation
from .errors import DemoError
from .examples import PROMPTS, example_messages, example_picture
from .handlers import ChatHandlers
from .service import DemoService
from .settings import MAX_TEMPERATURE, RANDOM_SEED

GENERATE = "generate"  # the concurrency group of the events that run the model

INTRO = """# Qwen-VL
Model **{name}**. Attach one or more pictures with the clip button, ask about them, and keep
talking. Answers stream in; when an answer names boxes (`<ref>…</ref><box>…</box>`, e.g.
*Find every shape* or *框出图中…的位置*), they are drawn on the latest picture below it."""


def _shown(error: DemoError) -> gr.Error:
    """A DemoError as the message box Gradio shows (escaped: the modal renders HTML)."""
    return gr.Error(html.escape(str(error)), print_exception=False)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a function or a generator function) with DemoError shown to the user."""

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except DemoError as e:
            raise _shown(e) from None

    @functools.wraps(fn)
    def stream(*args: Any) -> Iterator[Any]:
        try:
            yield from fn(*args)
        except DemoError as e:
            raise _shown(e) from None

    return stream if inspect.isgeneratorfunction(fn) else call


def build_demo(service: DemoService) -> gr.Blocks:
    """The demo app over ``service`` (not launched). Gradio's upload folder becomes the
    service's folder (``UploadFolder.activate``) until that folder is closed."""
    folder = service.folder.activate()
    limits = service.limits
    handlers = ChatHandlers(service)
    defaults = service.defaults
    picture = example_picture(folder.root)

    def chat(
        message: Any, conversation: Conversation, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> Iterator[tuple[Any, Any, Any]]:
        """``handlers.chat``, emptying and locking the message box while the answer streams."""
        first = True
        settings = (temperature, top_p, max_new_tokens, seed)
        for messages, conv in handlers.chat(message, conversation, *settings):
            box = gr.MultimodalTextbox(value=None, interactive=False) if first else gr.skip()
            first = False
            yield messages, conv, box

    with gr.Blocks(title="Qwen-VL demo", analytics_enabled=False) as demo:
        gr.Markdown(INTRO.format(name=html.escape(service.model_name)))
        state = gr.State(Conversation())
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(elem_id="chatbot", label="Conversation", height="64vh", min_height=420,
                                     feedback_options=None, buttons=["copy"])  # fmt: skip
                message = gr.MultimodalTextbox(
                    elem_id="message",
                    file_types=["image"],
                    file_count="multiple",
                    placeholder="Ask about the pictures (Enter sends, Shift+Enter starts a new line)",
                    show_label=False,
                    stop_btn=True,
                )
                with gr.Row():
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    undo = gr.Button("Undo last turn", elem_id="undo")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1, min_width=240):
                with gr.Accordion("Generation settings", open=True):
                    temperature = gr.Slider(0, MAX_TEMPERATURE, value=defaults.temperature, step=0.05,
                                            label="Temperature (0: greedy)", elem_id="temperature")  # fmt: skip
                    top_p = gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label="Top-p", elem_id="top_p")
                    max_tokens = gr.Slider(1, limits.max_new_tokens, value=defaults.max_new_tokens, step=1,
                                           label="Max new tokens", elem_id="max_tokens")  # fmt: skip
                    seed = gr.Number(value=RANDOM_SEED if defaults.seed is None else defaults.seed, precision=0,
                                     minimum=RANDOM_SEED, label="Seed (-1: random)", elem_id="seed")  # fmt: skip
        gr.Examples(example_messages(picture), inputs=[message], label="Examples (English, 中文)",
                    example_labels=list(PROMPTS), examples_per_page=len(PROMPTS))  # fmt: skip
        settings = [temperature, top_p, max_tokens, seed]
        enable = functools.partial(gr.MultimodalTextbox, interactive=True)

        sent = message.submit(_user_errors(chat), [message, state, *settings], [chatbot, state, message],
                              api_name="chat", concurrency_id=GENERATE)  # fmt: skip
        sent.then(enable, None, [message], api_visibility="private", queue=False)
        message.stop(None, None, None, cancels=[sent], api_visibility="private", queue=False)
        again = regenerate.click(_user_errors(handlers.regenerate), [state, *settings], [chatbot, state],
                                 api_name="regenerate", concurrency_id=GENERATE)  # fmt: skip
        undo.click(_user_errors(handlers.undo), [state], [chatbot, state, message], api_name="undo",
                   cancels=[sent, again], concurrency_limit=None)  # fmt: skip
        clear.click(handlers.clear, None, [chatbot, state, message], api_name="clear", cancels=[sent, again],
                    concurrency_limit=None)  # fmt: skip
        chatbot.clear(handlers.clear, None, [chatbot, state, message], cancels=[sent, again],
                      api_visibility="private", concurrency_limit=None)  # fmt: skip
    demo.queue(max_size=limits.max_queue, default_concurrency_limit=service.engine.max_batch_size)
    return demo


def launch(demo: gr.Blocks, service: DemoService, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Start the engine and serve ``demo`` in the background; returns its URL. Gradio's
    upload route refuses files above ``max_image_bytes``."""
    service.start()
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=service.limits.max_image_bytes,
        prevent_thread_lock=True,
        quiet=True,
        share=False,
        ssr_mode=False,
        show_error=False,
    )
    return f"http://{host}:{port}/"
