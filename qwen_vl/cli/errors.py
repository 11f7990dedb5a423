"""The one error type the command turns into ``qwen-vl: error: ...`` and exit code 2."""

from __future__ import annotations


class CliError(Exception):
    """Bad input from the user: reported on one line, never as a traceback."""
