"""from_list_format / to_list_format against the reference goldens (list_format.jsonl)."""

from __future__ import annotations

import pytest
from conftest import GOLDEN_DIR, read_jsonl


def _cases() -> list[dict]:
    path = GOLDEN_DIR / "list_format.jsonl"
    return read_jsonl(path) if path.is_file() else [{"id": "golden-missing", "op": "missing"}]


CASES = {c["id"]: c for c in _cases()}


def test_golden_file_is_complete(golden_dir):
    cases = read_jsonl(golden_dir / "list_format.jsonl")
    assert len(cases) == 44
    assert {c["op"] for c in cases} == {"from_list_format", "to_list_format"}


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_golden_case(case_id, golden_dir, tokenizer):
    case = CASES[case_id]
    if case["op"] not in ("from_list_format", "to_list_format"):
        pytest.fail(f"unknown op in {case_id}: {case['op']}")
    method = getattr(tokenizer, case["op"])
    if "error" in case:
        with pytest.raises(Exception) as info:
            method(case["input"])
        assert f"{info.type.__name__}: {info.value}" == case["error"]
    else:
        assert method(case["input"]) == case["output"]


def test_box_tuples_and_float_coordinates(tokenizer):
    elements = [{"image": "a.jpg"}, {"ref": "cat", "box": [(1.9, 2.1, 300, 400)]}, {"text": " done"}]
    text = tokenizer.from_list_format(elements)
    assert text == "Picture 1: <img>a.jpg</img>\n<ref>cat</ref><box>(1,2),(300,400)</box> done"
    assert tokenizer.to_list_format(text) == [
        {"text": "Picture 1: "},
        {"image": "a.jpg"},
        {"text": "\n"},
        {"ref": "cat"},
        {"box": "(1,2),(300,400)"},
        {"text": " done"},
    ]


def test_to_list_format_normalises_to_nfc(tokenizer):
    assert tokenizer.to_list_format("<ref>e\u0301</ref>") == [{"ref": "\u00e9"}]
