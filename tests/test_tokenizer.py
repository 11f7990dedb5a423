"""QWenTokenizer against the reference goldens (tokenizer.jsonl), plus the HF-facing surface."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import time

import numpy as np
import pytest
import torch
from conftest import GOLDEN_DIR, REPO_ROOT, read_jsonl

from qwen_vl.tokenizer import QWenTokenizer

VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


def _cases() -> list[dict]:
    path = GOLDEN_DIR / "tokenizer.jsonl"
    return read_jsonl(path) if path.is_file() else [{"id": "golden-missing", "op": "missing"}]


CASES = {c["id"]: c for c in _cases()}


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def python_kwargs(kwargs: dict) -> dict:
    """JSON lists for allowed_special / disallowed_special stand for Python sets."""
    out = dict(kwargs)
    for key in ("allowed_special", "disallowed_special"):
        if isinstance(out.get(key), list):
            out[key] = set(out[key])
    return out


def outcome(fn, *args, **kwargs) -> tuple[str, object]:
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the error text is what is compared
        return "error", error_text(exc)


def expected(case: dict, key: str) -> tuple[str, object]:
    if key in case:
        return "ok", case[key]
    return "error", case[f"{key}_error"]


def test_golden_file_is_complete(golden_dir):
    cases = read_jsonl(golden_dir / "tokenizer.jsonl")
    assert len(cases) == 308
    assert len({c["id"] for c in cases}) == 308


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_golden_case(case_id, golden_dir, tokenizer):
    case = CASES[case_id]
    kwargs = python_kwargs(case["kwargs"])
    if case["op"] == "encode":
        got = outcome(tokenizer.encode, case["text"], **kwargs)
        if "error" in case:
            assert got == ("error", case["error"])
            return
        assert got == ("ok", case["ids"])
        ids = got[1]
        assert outcome(tokenizer.decode, ids) == expected(case, "decoded")
        assert outcome(tokenizer.decode, ids, skip_special_tokens=True) == expected(case, "decoded_skip_special")
    elif case["op"] == "decode":
        got = outcome(tokenizer.decode, case["ids"], **kwargs)
        assert got == (("error", case["error"]) if "error" in case else ("ok", case["decoded"]))
    else:
        pytest.fail(f"unknown op in {case_id}: {case['op']}")


def test_vocabulary_layout(tokenizer):
    assert len(tokenizer) == 151860
    assert tokenizer.vocab_size == 151860
    assert len(tokenizer.mergeable_ranks) == 151643
    assert tokenizer.eod_id == 151643
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (151644, 151645)
    assert tokenizer.special_tokens["<|extra_0|>"] == 151646
    assert tokenizer.special_tokens["<|extra_204|>"] == 151850
    assert (tokenizer.ref_start_id, tokenizer.ref_end_id) == (151851, 151852)
    assert (tokenizer.box_start_id, tokenizer.box_end_id) == (151853, 151854)
    assert (tokenizer.quad_start_id, tokenizer.quad_end_id) == (151855, 151856)
    assert (tokenizer.img_start_id, tokenizer.img_end_id, tokenizer.img_pad_id) == (151857, 151858, 151859)
    assert tokenizer.IMAGE_ST == (
        "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"
    )  # fmt: skip
    assert tokenizer.image_start_tag == "<img>" and tokenizer.image_pad_tag == "<imgpad>"
    assert tokenizer.errors == "replace"
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 151860 and vocab[b"Hello"] == 9707 and vocab["<imgpad>"] == 151859


def test_tokens_are_bytes_and_specials_are_str(tokenizer):
    assert tokenizer.tokenize("Hello <ref>x</ref>") == [b"Hello", b" ", "<ref>", b"x", "</ref>"]
    assert tokenizer.convert_ids_to_tokens(9707) == b"Hello"
    assert tokenizer.convert_ids_to_tokens([9707, 151643]) == [b"Hello", "<|endoftext|>"]
    assert tokenizer.convert_ids_to_tokens([9707, 151643], skip_special_tokens=True) == [b"Hello"]
    assert tokenizer.convert_tokens_to_ids([b"Hello", "<img>"]) == [9707, 151857]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.convert_tokens_to_ids(b"\xff\xfe\xfd unknown") is None
    assert tokenizer.convert_tokens_to_string([b"\xe4\xbd", b"\xa0", "<|im_end|>", b"!"]) == "你<|im_end|>!"
    with pytest.raises(ValueError, match="unknown ids"):
        tokenizer.convert_ids_to_tokens(151860)


def test_allowed_special_accepts_lists_and_sets(tokenizer):
    text = "<|im_start|><img>a</img>"
    as_set = tokenizer.encode(text, allowed_special={"<img>", "</img>"})
    assert tokenizer.encode(text, allowed_special=["<img>", "</img>"]) == as_set
    assert as_set[:6] == [27, 91, 318, 4906, 91, 29]  # "<|im_start|>" as plain text
    assert as_set[6] == tokenizer.img_start_id and len(as_set) == 6 + 258


def test_decode_accepts_ints_lists_tensors_arrays(tokenizer):
    ids = [9707, 1879]
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.decode(9707) == "Hello"
    assert tokenizer.decode(torch.tensor(ids)) == "Hello world"
    assert tokenizer.decode(torch.tensor(9707)) == "Hello"
    assert tokenizer.decode(np.array(ids)) == "Hello world"
    assert tokenizer.decode(np.int64(9707)) == "Hello"
    assert tokenizer.decode([[9707], [1879]]) == ["Hello", " world"]
    assert tokenizer.batch_decode(torch.tensor([[9707], [1879]])) == ["Hello", " world"]


def test_decode_keep_image_special_drops_image_tags(tokenizer):
    ids = tokenizer.encode("<img>a.jpg</img><ref>cat</ref>")
    assert tokenizer.decode(ids, skip_special_tokens=True, keep_image_special=True) == "a.jpg<ref>cat</ref>"


def test_decode_errors_policy(tokenizer):
    broken = [tokenizer.encode("你")[0], 0]  # a whole CJK char then '!' -- valid
    assert tokenizer.decode(broken) == "你!"
    lone = list(b"\xe4")  # byte token ids for a truncated UTF-8 sequence
    lone_ids = [tokenizer.mergeable_ranks[bytes([b])] for b in lone]
    assert tokenizer.decode(lone_ids) == "\ufffd"
    assert tokenizer.decode(lone_ids, errors="ignore") == ""
    with pytest.raises(UnicodeDecodeError):
        tokenizer.decode(lone_ids, errors="strict")


def test_call_pads_batches_on_both_sides(checkpoint_dir):
    tok = QWenTokenizer.from_pretrained(checkpoint_dir)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    right = tok(["Hello world", "Hi"], padding=True, return_tensors="pt")
    assert set(right.keys()) == {"input_ids", "attention_mask"}
    assert right["input_ids"].tolist() == [[9707, 1879], [13048, 151643]]
    assert right["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert right["input_ids"].dtype == torch.long

    left = tok(["Hello world", "Hi"], padding=True, padding_side="left", return_tensors="pt")
    assert left["input_ids"].tolist() == [[9707, 1879], [151643, 13048]]
    assert left["attention_mask"].tolist() == [[1, 1], [0, 1]]

    tok_left = QWenTokenizer.from_pretrained(checkpoint_dir, padding_side="left")
    assert tok_left(["Hello world", "Hi"], padding=True)["input_ids"] == [[9707, 1879], [151643, 13048]]


def test_call_single_text_matches_encode(tokenizer):
    text = "Picture 1: <img>a.jpg</img>\n<|im_start|>hi"
    out = tokenizer(text)
    assert out["input_ids"] == tokenizer.encode(text)
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    restricted = tokenizer(text, allowed_special=set())["input_ids"]
    assert restricted == tokenizer.encode(text, allowed_special=set())
    assert tokenizer.im_start_id not in restricted
    assert tokenizer.encode("Hello world", return_tensors="pt").tolist() == [[9707, 1879]]


def test_construct_from_vocab_file(checkpoint_dir):
    tok = QWenTokenizer(vocab_file=str(checkpoint_dir / "qwen.tiktoken"))
    assert tok.encode("Hello world") == [9707, 1879]
    assert len(tok) == 151860


def test_save_pretrained_round_trip(tokenizer, checkpoint_dir, tmp_path):
    files = tokenizer.save_pretrained(tmp_path)
    assert {p.rsplit("/", 1)[-1] for p in files} == {"tokenizer_config.json", "qwen.tiktoken"}
    saved_vocab = (tmp_path / "qwen.tiktoken").read_bytes()
    assert hashlib.sha256(saved_vocab).hexdigest() == VOCAB_SHA256
    official = json.loads((checkpoint_dir / "tokenizer_config.json").read_text())
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == official

    again = QWenTokenizer.from_pretrained(tmp_path)
    text = "Picture 1: <img>图片/猫.jpg</img>\n<ref>猫</ref><box>(1,2),(3,4)</box> ok"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.decode(again.encode(text)) == text


def test_save_pretrained_keeps_changed_settings(checkpoint_dir, tmp_path):
    tok = QWenTokenizer.from_pretrained(checkpoint_dir, padding_side="left", errors="ignore")
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert list(config)[:3] == ["model_max_length", "tokenizer_class", "auto_map"]
    assert config["padding_side"] == "left" and config["errors"] == "ignore"
    again = QWenTokenizer.from_pretrained(tmp_path)
    assert again.padding_side == "left" and again.errors == "ignore"


def test_pickle_round_trip(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = "Hello <img>x.png</img> 世界"
    assert clone.encode(text) == tokenizer.encode(text)


def test_adding_tokens_is_refused(tokenizer):
    with pytest.raises(ValueError, match="not supported"):
        tokenizer.add_tokens(["brand-new"])
    with pytest.raises(ValueError, match="not supported"):
        tokenizer.add_special_tokens({"extra_special_tokens": ["<brand-new>"]})


def test_long_text_encodes_quickly(tokenizer):
    unit = "Hello wörld, 你好！ <ref>cat</ref> <img>images/a.png</img>\n\n  code(x) = 42;\t"
    text = (unit * (100_000 // len(unit) + 1))[:100_000]
    text = text[: text.rfind("<img>")]  # do not cut a span open
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    tokenizer.tokenizer.encode(text, allowed_special="all")
    bare = time.perf_counter() - start
    assert ids.count(tokenizer.img_start_id) > 1000
    assert ours - bare < 0.5, f"encode took {ours:.3f}s, tiktoken alone {bare:.3f}s"
    start = time.perf_counter()
    assert tokenizer.decode(ids) == text
    assert time.perf_counter() - start < 1.0


def test_docs_examples_run(checkpoint_dir):
    doc = (REPO_ROOT / "docs" / "tokenizer.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) >= 6
    source = "\n".join(blocks)
    placeholder = 'ckpt = "../shared/golden/checkpoint"'
    assert placeholder in source
    namespace: dict = {}
    exec(
        compile(source.replace(placeholder, f"ckpt = {str(checkpoint_dir)!r}"), "docs/tokenizer.md", "exec"), namespace
    )
