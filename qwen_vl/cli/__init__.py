"""The ``qwen-vl`` command: ``generate``, ``chat``, ``bench``, ``finetune``, ``merge``, ``eval``, ``synth``, ``init``,
``pretrain-vision``, ``serve``, ``demo`` and ``quantize``.

Each subcommand is a thin argparse shell over typed functions (``generate.generate``,
``generate.answer_once``, ``chat.ChatLoop``, ``bench.run_bench``, ``synth.synth``) that tests call directly.
Bad input ends with one ``qwen-vl: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench, chat, demo, eval, finetune, generate, init, merge, pretrain_vision, quantize, serve, synth
from .errors import CliError
from .session import GenerationFailed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-vl", description="Qwen-VL vision-language models")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{generate,chat,bench,finetune,merge,quantize,eval,synth,init,pretrain-vision,serve,demo}",
    )
    generate.add_parser(sub)
    chat.add_parser(sub)
    bench.add_parser(sub)
    finetune.add_parser(sub)
    merge.add_parser(sub)
    quantize.add_parser(sub)
    eval.add_parser(sub)
    synth.add_parser(sub)
    init.add_parser(sub)
    pretrain_vision.add_parser(sub)
    serve.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CliError, OSError, ValueError) as e:
        print(f"qwen-vl: error: {e}", file=sys.stderr)
        return 2
    except GenerationFailed as e:
        print(f"qwen-vl: error: generation failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


__all__ = ["CliError", "build_parser", "main"]
