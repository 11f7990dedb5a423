"""``qwen-vl chat``: an interactive conversation on the terminal (or over a pipe).

Lines are messages; lines starting with ``:`` are commands (see ``HELP``). Answers
stream as they are generated. A positional query answers once and exits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from .annotate import save_boxes
from .generate import generate
from .image_store import ImageStore
from .loading import check_model_dir, load_model, load_tokenizer
from .options import (
    add_generation_flags,
    add_image_flags,
    add_model_flags,
    generation_options,
    image_options,
    model_options,
)
from .session import Answer, ChatSession, GenerationFailed

DEFAULT_SAVE_DIR = "qwen-vl-out"

HELP = """commands:
  :image PATH   attach an image to the next message
  :clear        forget the conversation
  :history      show the conversation
  :save [DIR]   draw the last answer's boxes into DIR (also where later ones go)
  :help         this text
  :quit         leave (so does end of input)"""


def terminal_lines(stdin: TextIO, prompt: str = "> ") -> Iterator[str]:
    """Lines typed at ``stdin``: with line editing on a terminal, plain reads on a pipe."""
    if stdin.isatty():
        while True:
            try:
                yield input(prompt)
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        for line in stdin:
            yield line.rstrip("\r\n")


class ChatLoop:
    """Reads messages and commands, answers them with ``session``, writes to ``out``/``err``."""

    def __init__(self, session: ChatSession, out: TextIO, err: TextIO, save_dir: str | Path = DEFAULT_SAVE_DIR) -> None:
        self.session = session
        self.out = out
        self.err = err
        self.save_dir = Path(save_dir)
        self.last: Answer | None = None

    def note(self, text: str) -> None:
        print(f"qwen-vl: {text}", file=self.err, flush=True)

    def run(self, lines: Iterable[str]) -> int:
        """Handle every line until ``:quit`` or the end of ``lines``; returns the exit code."""
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if text.startswith(":") and self.command(text):
                return 0
            if not text.startswith(":"):
                self.message(text)
        return 0

    def command(self, text: str) -> bool:
        """Run one command; True when it ends the conversation."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in (":quit", ":q", ":exit"):
            return True
        if name == ":image" and not arg:
            self.note("usage: :image PATH")
        elif name == ":image":
            try:
                self.session.attach(arg)
                self.note(f"{arg} attached to the next message")
            except (OSError, ValueError) as e:
                self.note(f"error: {e}")
        elif name == ":clear":
            self.session.clear()
            self.last = None
            self.note("conversation cleared")
        elif name == ":history":
            for i, (query, response) in enumerate(self.session.history, 1):
                print(f"[{i}] user: {query}\n[{i}] assistant: {response}", file=self.out)
            if not self.session.history:
                print("(empty)", file=self.out)
            self.out.flush()
        elif name == ":save":
            if arg:
                self.save_dir = Path(arg)
            if self.last is None or not self.save(self.last):
                self.note(f"nothing to draw; boxes will be saved in {self.save_dir}")
        elif name == ":help":
            print(HELP, file=self.out, flush=True)
        else:
            self.note(f"unknown command {text!r} (:help lists them)")
        return False

    def message(self, text: str) -> None:
        """Answer one message, streaming it to ``out``."""

        def show(piece: str) -> None:
            self.out.write(piece)
            self.out.flush()

        try:
            answer = self.session.ask(text, on_text=show)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=self.out, flush=True)
            return
        except (OSError, ValueError, GenerationFailed) as e:
            self.note(f"error: {e}")
            return
        print(file=self.out, flush=True)
        self.last = answer
        if answer.boxes:
            self.save(answer)

    def save(self, answer: Answer) -> bool:
        """Draw ``answer``'s boxes on the latest picture; True when a file was written."""
        queries = [q for q, _ in self.session.history]
        try:
            path = save_boxes(answer.response, queries or [answer.query], self.session.store, self.save_dir)
        except (OSError, ValueError) as e:
            self.note(f"error: cannot save the boxes: {e}")
            return False
        if path is not None:
            print(f"(boxes drawn in {path})", file=self.out, flush=True)
        return path is not None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat about images (interactive; or one answer with a QUERY)",
        description="Interactive chat; lines starting with ':' are commands.\n\n" + HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("query", nargs="?", default=None, help="answer this one question and exit")
    p.add_argument("--save-dir", default=DEFAULT_SAVE_DIR, metavar="DIR", help="where drawn boxes are saved")
    add_model_flags(p)
    add_image_flags(p)
    add_generation_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.query is not None:
        answer = generate(model_options(args), args.query, args.image, generation_options(args), image_options(args))
        print(answer.response)
        return 0
    opts = model_options(args)
    check_model_dir(opts.model_dir)
    tokenizer = load_tokenizer(opts.model_dir)
    store = ImageStore(image_options(args).policy())
    for source in args.image:
        store.add_named(source)
    model = load_model(opts)
    with ChatSession(model, tokenizer, generation_options(args), store, opts.max_seq_len, opts.decode_mode) as session:
        for source in args.image:
            session.attach(source)
        if sys.stdin.isatty():
            print("qwen-vl chat: type a message, :help for commands, :quit to leave", file=sys.stderr)
        return ChatLoop(session, sys.stdout, sys.stderr, args.save_dir).run(terminal_lines(sys.stdin))
