"""The one error type a demo user sees as a message (the app shows it; nothing crashes)."""

from __future__ import annotations


class DemoError(ValueError):
    """Bad input from a user of the demo: the message names the problem."""
