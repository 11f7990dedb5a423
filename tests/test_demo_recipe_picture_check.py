"""The demo recipe's picture check: teacher-forced answer choice with a record's own picture
and with another record's."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from qwen_vl.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]


def load_picture_check():
    path = REPO / "recipes" / "demo_model" / "picture_check.py"
    spec = importlib.util.spec_from_file_location("demo_picture_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def heldout(tmp_path: Path) -> Path:
    generate(tmp_path, 40, seed=21, kinds=["colour", "shape", "caption"])
    return tmp_path


def test_a_model_that_reads_the_picture_is_right_with_its_own(tokenizer, heldout, monkeypatch):
    check = load_picture_check()
    truth = {}
    for line in (heldout / "truth.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        truth[record["images"][0]] = record["turns"][0]["answer"]

    def reads_the_picture(model, context, options):  # the answer true of the picture shown
        shown = re.search(r"<img>.*?(images/\d+\.png)</img>", tokenizer.decode(context)).group(1)
        return [0.0 if tokenizer.decode(o[:-1]) == truth[shown] else 1.0 for o in options]

    monkeypatch.setattr(check, "option_losses", reads_the_picture)
    rows = check.check(None, tokenizer, heldout, per_kind=5)
    groups = check.closed_questions(heldout)
    assert {(r["kind"], r["lang"]) for r in rows} == set(groups) and {k for k, _ in groups} == {"colour", "shape"}
    for row in rows:
        records = groups[(row["kind"], row["lang"])]
        assert row["questions"] == min(5, len(records))
        assert row["options"] == len({r["turns"][0]["answer"] for r in records})
        assert row["own_picture"] == 100.0
        assert row["other_picture"] < 100.0 or row["options"] == 1


def test_a_folder_without_truth_is_named(tmp_path, capsys):
    check = load_picture_check()
    with pytest.raises(SystemExit, match="no truth.jsonl"):
        check.main([str(tmp_path), str(tmp_path)])
