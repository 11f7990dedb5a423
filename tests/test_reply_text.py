"""Streamed reply text: pieces held back one event, whitespace held back until text follows,
so that what a stream shows joins into exactly the final (stripped) answer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_vl.engine.reply_text import HeldBackText, readable_ids


def streamed(pieces: list[str], final: str) -> list[str]:
    """What a ``HeldBackText`` shows when fed ``pieces`` and finished with ``final``."""
    shown: list[str] = []
    held = HeldBackText(shown.append)
    for piece in pieces:
        held.feed(piece)
    held.finish(final)
    return shown


def test_trailing_whitespace_of_a_dropped_end_is_never_shown() -> None:
    assert "".join(streamed(["hi", " ", "\n", "x"], "hi")) == "hi"


def test_whitespace_is_shown_once_text_follows() -> None:
    shown: list[str] = []
    held = HeldBackText(shown.append)
    for piece in ["hi", " ", "\n", "there", "!"]:
        held.feed(piece)
    assert "".join(shown) == "hi \nthere"
    held.finish("hi \nthere!")
    assert "".join(shown) == "hi \nthere!"


def test_leading_whitespace_is_not_shown() -> None:
    assert "".join(streamed(["\n", " hello", " world", "<end>"], "hello world")) == "hello world"


def test_each_piece_waits_one_event() -> None:
    shown: list[str] = []
    held = HeldBackText(shown.append)
    held.feed("a")
    assert shown == []
    held.feed("b")
    assert shown == ["a"]
    held.finish("ab")
    assert shown == ["a", "b"]


def test_final_that_disagrees_with_the_stream_is_not_repeated() -> None:
    shown = streamed(["hello", " wor", "ld", "x"], "goodbye")
    assert "".join(shown) == "hello world"
    assert "goodbye" not in "".join(shown)


def test_final_shorter_than_what_was_shown_adds_nothing() -> None:
    assert "".join(streamed(["abc", "def", "g"], "abc")) == "abcdef"


def test_no_sink_and_empty_answer() -> None:
    held = HeldBackText(None)
    held.feed("x")
    held.finish("x")
    assert held.shown == "x"
    assert streamed([], "") == []
    assert streamed([" ", "\n"], "") == []


@given(st.lists(st.text(alphabet="ab \n\t", max_size=4), max_size=8), st.booleans())
def test_pieces_join_into_the_stripped_answer(pieces: list[str], drop_last: bool) -> None:
    kept = pieces[:-1] if drop_last and pieces else pieces
    final = "".join(kept).strip()
    shown = streamed(pieces, final)
    assert "".join(shown) == final
    assert all(shown)


@pytest.mark.parametrize(
    ("ids", "keep_last", "expected"),
    [([1, 99, 2, 100], True, [1, 2, 100]), ([1, 99, 2, 100], False, [1, 2]), ([], True, [])],
)
def test_readable_ids(ids: list[int], keep_last: bool, expected: list[int]) -> None:
    assert readable_ids(ids, 10, keep_last) == expected
