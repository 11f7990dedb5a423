"""Incremental detokenization never splits characters and adds up to the full decode."""

from __future__ import annotations

import base64
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl.engine.detokenize import IncrementalDetokenizer

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Characters of 1 to 4 UTF-8 bytes, common and rare, so that tokens split characters.
ALPHABET = "ab Z9,.\n中文字你好世界鱻龘𠀀𠀁𪚥한국العαβдж€😀🙂👍🏽🧑‍💻𝔘𓀀\u0301"


@pytest.fixture(scope="module")
def encoding(checkpoint_dir: Path):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    with open(checkpoint_dir / "qwen.tiktoken", "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    enc = tiktoken.Encoding("qwen-test", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
    enc.test_ranks = ranks
    return enc


def run(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.finish())
    return pieces


def random_segmentation(data: bytes, ranks: dict[bytes, int], rng: random.Random) -> list[int]:
    """Token ids for ``data`` cut at random points (every single byte is a token)."""
    ids, i = [], 0
    while i < len(data):
        sizes = [n for n in range(1, 7) if data[i : i + n] in ranks and i + n <= len(data)]
        n = rng.choice(sizes)
        ids.append(ranks[data[i : i + n]])
        i += n
    return ids


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40))
def test_real_tokenizer_increments_are_whole_characters(encoding, text: str) -> None:
    ids = encoding.encode(text)
    decode = encoding.decode
    pieces = run(IncrementalDetokenizer(lambda x: decode(x, errors="replace")), ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text == decode(ids, errors="replace")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40), seed=st.integers(0, 2**32))
def test_random_byte_cuts_are_whole_characters(encoding, text: str, seed: int) -> None:
    ids = random_segmentation(text.encode(), encoding.test_ranks, random.Random(seed))
    pieces = run(IncrementalDetokenizer(lambda x: encoding.decode(x, errors="replace")), ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


def test_text_comes_out_as_soon_as_complete(encoding) -> None:
    detok = IncrementalDetokenizer(lambda x: encoding.decode(x, errors="replace"))
    ranks = encoding.test_ranks
    emoji = "🙂".encode()  # 4 bytes, one token per byte
    assert [detok.push(ranks[bytes([b])]) for b in emoji] == ["", "", "", "🙂"]
    assert detok.push(ranks[b"a"]) == "a"
    assert detok.finish() == ""


# ---- a byte-per-token decoder, to control invalid bytes exactly ---------------


class ByteDecoder:
    """Token i is byte i; records the length of every decoded window."""

    def __init__(self) -> None:
        self.window_sizes: list[int] = []

    def __call__(self, ids: list[int]) -> str:
        self.window_sizes.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


def test_invalid_bytes_are_emitted() -> None:
    detok = IncrementalDetokenizer(ByteDecoder())
    assert detok.push(0x80) == ""  # could be the start of a held character
    assert detok.push(ord("a")) == "\ufffda"
    assert detok.push(0xE4) == ""
    assert detok.push(0xB8) == ""
    assert detok.finish() == "\ufffd"  # an unfinished character at the end


def test_persisting_replacement_is_emitted_after_a_few_tokens() -> None:
    # Ids >= 256 decode to nothing, so they never complete the held character.
    detok = IncrementalDetokenizer(lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace"))
    pieces = [detok.push(t) for t in [ord("x"), 0xF0, 0x9F, 300, 301, 302, 303, ord("y")]]
    assert pieces == ["x", "", "", "", "", "", "\ufffd", "y"]  # emitted at the 5th further token
    assert detok.finish() == ""


def test_skip_ids() -> None:
    detok = IncrementalDetokenizer(ByteDecoder(), skip_ids={ord("!")})
    assert "".join(run(detok, list(b"hi! there!"))) == "hi there"


def test_window_stays_small_on_long_sequences() -> None:
    dec = ByteDecoder()
    text = "中文🙂abc€" * 300
    pieces = run(IncrementalDetokenizer(dec), list(text.encode()))
    assert "".join(pieces) == text
    assert max(dec.window_sizes) <= 12


def test_window_stays_small_when_every_token_splits_a_character(encoding) -> None:
    """Tokens like [tail of one character + head of the next] keep the text partial at every step."""
    data = ("中" * 200).encode()  # e4 b8 ad, repeated
    sizes = [2] + [3] * 199 + [1]  # cut inside every character
    chunks, i = [], 0
    for n in sizes:
        chunks.append(data[i : i + n])
        i += n
    ids = list(range(len(chunks)))
    calls: list[int] = []

    def decode(window: list[int]) -> str:
        calls.append(len(window))
        return b"".join(chunks[j] for j in window).decode("utf-8", errors="replace")

    pieces = run(IncrementalDetokenizer(decode), ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == "中" * 200
    assert max(calls) <= 12
    assert len(calls) <= 3 * len(ids)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=120),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
)
def test_any_byte_chunking_is_whole_characters_with_a_small_window(text: str, sizes: list[int]) -> None:
    """Tokens are the text's bytes cut cyclically by ``sizes``, often inside characters for many tokens in a row."""
    data, chunks, i = text.encode(), [], 0
    while i < len(data):
        chunks.append(data[i : i + sizes[len(chunks) % len(sizes)]])
        i += len(chunks[-1])
    calls: list[int] = []

    def decode(window: list[int]) -> str:
        calls.append(len(window))
        return b"".join(chunks[j] for j in window).decode("utf-8", errors="replace")

    pieces = run(IncrementalDetokenizer(decode), list(range(len(chunks))))
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text
    assert max(calls) <= 20
    assert len(calls) <= 2 * len(chunks) + 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=40))
def test_arbitrary_bytes_add_up_to_the_full_decode(data: bytes) -> None:
    pieces = run(IncrementalDetokenizer(ByteDecoder()), list(data))
    assert "".join(pieces) == data.decode("utf-8", errors="replace")
