"""Stop words on token ids and stop strings on streamed text."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl.engine.stopping import STOP_SCORE, StopStringMatcher, force_eos_after_stop_words, stop_word_hits

EOS = 9
V = 12


def reference_hits(rows: list[list[int]], stop_words: list[list[int]], eos: int) -> list[bool]:
    """The reference processor's rule on unpadded rows, written plainly."""
    seqs = [s for s in stop_words if s != [eos]]
    return [any(len(s) <= len(r) and r[len(r) - len(s) :] == s for s in seqs) for r in rows]


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    mask = torch.arange(T)[None, :] >= (T - lengths)[:, None]
    return ids, mask, lengths


def test_basic_match_sets_eos_score() -> None:
    rows = [[1, 2, 3], [1, 3, 2], [4, 5, 3], [3, 3, 3]]
    ids, mask, _ = left_pad(rows)
    scores = torch.zeros(4, V)
    out = force_eos_after_stop_words(scores, ids, mask, [[2, 3], [5, 3]], EOS)
    assert out is scores
    assert scores[:, EOS].tolist() == [STOP_SCORE, 0.0, STOP_SCORE, 0.0]
    assert scores[:, :EOS].abs().sum() == 0 and scores[:, EOS + 1 :].abs().sum() == 0


def test_empty_stop_list_changes_nothing() -> None:
    ids = torch.tensor([[1, 2, 3]])
    scores = torch.randn(1, V)
    before = scores.clone()
    force_eos_after_stop_words(scores, ids, None, [], EOS)
    assert torch.equal(scores, before)
    assert stop_word_hits(ids, None, []).tolist() == [False]


def test_stop_sequence_longer_than_row_or_batch() -> None:
    ids, mask, lengths = left_pad([[7, 8], [6, 7, 8]])
    assert stop_word_hits(ids, mask, [[6, 7, 8]]).tolist() == [False, True]
    assert stop_word_hits(ids, lengths, [[6, 7, 8]]).tolist() == [False, True]
    assert stop_word_hits(ids, None, [[5, 6, 7, 8]]).tolist() == [False, False]  # longer than T


def test_no_match_across_padding() -> None:
    # Row 0 is [7, 8] left-padded with 6: the ids read [6, 7, 8] but 6 is padding.
    ids, mask, lengths = left_pad([[7, 8], [6, 7, 8]], pad=6)
    assert stop_word_hits(ids, None, [[6, 7, 8]]).tolist() == [True, True]
    assert stop_word_hits(ids, mask, [[6, 7, 8]]).tolist() == [False, True]
    assert stop_word_hits(ids, lengths, [[6, 7, 8]]).tolist() == [False, True]
    assert stop_word_hits(ids, mask, [[7, 8]]).tolist() == [True, True]


def test_multiple_matches_and_eos_only_sequence() -> None:
    ids = torch.tensor([[1, 2, 3], [0, 0, EOS]])
    stops = [[3], [2, 3], [1, 2, 3], [EOS]]
    assert stop_word_hits(ids, None, stops, EOS).tolist() == [True, False]  # [EOS] alone is dropped
    assert stop_word_hits(ids, None, stops).tolist() == [True, True]
    with pytest.raises(ValueError, match="empty"):
        stop_word_hits(ids, None, [[]])


def test_random_rows_match_reference() -> None:
    rng = random.Random(0)
    for _ in range(200):
        rows = [[rng.randint(0, 3) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 5))]
        stops = [[rng.randint(0, 3) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(0, 4))]
        eos = rng.randint(0, 3)
        ids, mask, lengths = left_pad(rows, pad=rng.randint(0, 3))
        expected = reference_hits(rows, stops, eos)
        assert stop_word_hits(ids, mask, stops, eos).tolist() == expected
        assert stop_word_hits(ids, lengths, stops, eos).tolist() == expected
        scores = torch.zeros(len(rows), 4)
        force_eos_after_stop_words(scores, ids, mask, stops, eos)
        assert (scores[:, eos] == STOP_SCORE).tolist() == expected


# ---- stop strings -------------------------------------------------------------


def stream(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, bool, list[str]]:
    pieces, stopped = [], False
    for chunk in chunks:
        piece, stopped = matcher.feed(chunk)
        pieces.append(piece)
        if stopped:
            break
    pieces.append(matcher.flush())
    return "".join(pieces), stopped, pieces


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut before the stop string that completes first (earliest end, then earliest start)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return (text, False) if best is None else (text[: best[1]], True)


def test_stop_string_split_across_feeds() -> None:
    m = StopStringMatcher(["<|im_end|>"])
    outs = [m.feed(c) for c in ["Hello", " wor", "ld<", "|im", "_e", "nd|", ">tail"]]
    assert outs == [("Hello", False), (" wor", False), ("ld", False), ("", False), ("", False), ("", False), ("", True)]
    assert m.matched == "<|im_end|>"
    assert m.flush() == ""
    assert m.feed("more") == ("", True)


def test_held_back_text_is_released() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("OP? no, STO") == ("", True)
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("x") == ("STx", False)
    assert m.feed("ST") == ("", False)
    assert m.flush() == "ST"


def test_empty_stop_list_passes_everything() -> None:
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_overlapping_prefixes() -> None:
    # "aab" after "aa": the held "aa" must keep the second "a" as a possible start.
    assert stream(StopStringMatcher(["ab"]), ["a", "a", "b", "c"])[:2] == ("a", True)
    assert stream(StopStringMatcher(["aab"]), ["a", "a", "a", "b"])[:2] == ("a", True)
    # The stop string completing first wins, whatever the chunking.
    for chunks in (["abc"], ["a", "b", "c"], ["ab", "c"]):
        assert stream(StopStringMatcher(["abc", "b"]), chunks)[:2] == ("a", True)
    assert stream(StopStringMatcher(["bc", "abc"]), ["xabcd"])[:2] == ("x", True)


def test_unicode_stop_strings() -> None:
    m = StopStringMatcher(["。\n", "🙂"])
    assert m.feed("你好") == ("你好", False)
    assert m.feed("。") == ("", False)
    assert m.feed("世界🙂!") == ("。世界", True)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab<|>中🙂 ", max_size=30),
    stops=st.lists(st.text(alphabet="ab<|>中🙂", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_any_chunking_gives_the_reference_cut(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    out, stopped, pieces = stream(StopStringMatcher(stops), chunks)
    assert (out, stopped) == reference_cut(text, stops)
    # Nothing emitted before the end ever contains a whole stop string.
    assert not any(s in out for s in stops)
