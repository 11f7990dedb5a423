"""Property tests: round trips and the only errors encode/decode may raise."""

from __future__ import annotations

import re
import unicodedata

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

FRAGMENTS = [
    "<img>", "</img>", "<imgpad>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>", "<|extra_205|>",
    "<|", "|>", "<im", "g>", "</", "<", ">", "a.jpg", "图片/猫.png", "e\u0301", "\r\n", "\n\n", "  ", "'ll", "😀",
]  # fmt: skip

# Any Unicode except lone surrogates, which cannot be UTF-8 encoded.
CHARS = st.characters(blacklist_categories=("Cs",))
PIECE = st.one_of(st.text(CHARS, max_size=12), st.sampled_from(FRAGMENTS))
# Image spans: short paths (maybe holding tag fragments), and paths around the 256-byte limit.
SPAN = st.one_of(
    st.lists(PIECE, max_size=3).map(lambda parts: "<img>" + "".join(parts) + "</img>"),
    st.integers(min_value=250, max_value=260).map(lambda n: "<img>" + "p" * n + "</img>"),
)
TEXT = st.lists(st.one_of(PIECE, PIECE, SPAN), max_size=10).map("".join)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IMAGE_ERRORS = (
    r"ValueError: Unclosed image token",
    r"ValueError: The content in <img>\.\.</img> is too long",
    r"TypeError: sequence item \d+: expected a bytes-like object, str found",
)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def image_starts(tokenizer, ids: list[int]) -> list[int]:
    return [k for k, t in enumerate(ids) if t == tokenizer.img_start_id]


@SETTINGS
@given(TEXT)
def test_plain_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, allowed_special=set())
    assert all(i < tokenizer.eod_id for i in ids)
    assert tokenizer.decode(ids) == nfc(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == nfc(text)


@SETTINGS
@given(TEXT)
def test_default_encoding_round_trips_or_raises_documented_errors(tokenizer, text):
    try:
        ids = tokenizer.encode(text)
    except (ValueError, TypeError) as exc:
        message = f"{type(exc).__name__}: {exc}"
        assert any(re.fullmatch(p, message) for p in IMAGE_ERRORS), message
        assert "<img>" in nfc(text)
        event(f"encode raised {type(exc).__name__}")
        return
    try:
        decoded = tokenizer.decode(ids)
    except ValueError as exc:
        # Only a span holding exactly 256 path bytes (no <imgpad>) cannot be decoded.
        assert str(exc) == f"{tokenizer.img_pad_id} is not in list"
        assert any(tokenizer.img_pad_id not in ids[k + 1 : k + 257] for k in image_starts(tokenizer, ids))
        return
    assert decoded == nfc(text)
    event(f"{len(image_starts(tokenizer, ids))} image spans")
    for k in image_starts(tokenizer, ids):
        assert ids[k + 257] == tokenizer.img_end_id
        assert all(i < 256 or i == tokenizer.img_pad_id for i in ids[k + 1 : k + 257])


@SETTINGS
@given(TEXT, st.sets(st.sampled_from(["<img>", "</img>", "<ref>", "<|im_start|>", "<|endoftext|>"])))
def test_restricted_specials_never_raise_unexpected_errors(tokenizer, text, allowed):
    try:
        ids = tokenizer.encode(text, allowed_special=allowed)
    except (ValueError, TypeError) as exc:
        message = f"{type(exc).__name__}: {exc}"
        assert any(re.fullmatch(p, message) for p in IMAGE_ERRORS), message
        return
    specials = {tokenizer.decoder[i] for i in ids if i >= tokenizer.eod_id} - {"<imgpad>"}
    assert specials <= allowed
    try:
        decoded = tokenizer.decode(ids)
    except ValueError as exc:
        # A path holding a special-token string is re-encoded by tiktoken, which refuses it;
        # a 256-byte path has no <imgpad> to end it.
        assert "disallowed special token" in str(exc) or str(exc) == f"{tokenizer.img_pad_id} is not in list"
        event("decode refused a path")
        return
    assert decoded == nfc(text)


ANY_ID = st.one_of(
    st.integers(min_value=0, max_value=151859),
    st.integers(min_value=0, max_value=300),
    st.sampled_from([151643, 151644, 151851, 151853, 151857, 151858, 151859]),
)


@SETTINGS
@given(st.lists(ANY_ID, max_size=40))
def test_decode_of_any_valid_ids_fails_only_on_image_spans(tokenizer, ids):
    try:
        text = tokenizer.decode(ids)
    except ValueError as exc:  # UnicodeDecodeError included: a span's path must be valid UTF-8
        assert tokenizer.img_start_id in ids, exc
        event("decode raised ValueError")
        return
    assert isinstance(text, str)
    kept = tokenizer.decode(ids, skip_special_tokens=True, keep_image_special=True)
    assert "<|" not in kept or "<|" in tokenizer.decode([i for i in ids if i < tokenizer.eod_id])
