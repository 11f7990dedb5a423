"""The ``synthetic`` evaluation task: reading a generated folder, prompts, the scorer on
hand-written answers in English and Chinese (malformed ones score wrong, never raise),
the summary keys, and an end-to-end run on the golden checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_vl.data.conversations import LANGS
from qwen_vl.data.synthetic import generate, make_sample
from qwen_vl.eval.registry import all_tasks, get_task
from qwen_vl.eval.runner import EvalSettings, evaluate
from qwen_vl.eval.tasks.base import EvalItem
from qwen_vl.eval.tasks.synthetic import METRICS, SyntheticTask, is_correct
from qwen_vl.finetune.records import DataError

RED_CIRCLE = {"object": 0, "colour": "red", "shape": "circle", "box": [100, 100, 300, 300]}
BLUE_SQUARE = {"colour": "blue", "shape": "square", "box": [500, 500, 700, 700]}
CAPTION = {"objects": [["red", "circle"], ["blue", "square"], ["red", "circle"]]}
FIND_ALL = {"objects": [{k: RED_CIRCLE[k] for k in ("colour", "shape", "box")}, BLUE_SQUARE]}
RECOLOUR = {"type": "colour", "colour": "red", "shape": "circle", "new_colour": "blue", "object": 0}
REMOVED = {"type": "removed", "colour": "red", "shape": "circle", "object": 0}
ADDED = {"type": "added", "colour": "green", "shape": "star", "object": 3}
MOVED = {"type": "moved", "colour": "red", "shape": "circle", "object": 0}
FOUND_EN = "<ref>red circle</ref><box>(100,100),(300,300)</box><ref>blue square</ref><box>(500,500),(700,700)</box>"
FOUND_ZH = "<ref>蓝色的正方形</ref><box>(505,498),(702,690)</box><ref>红色的圆形</ref><box>(98,101),(300,296)</box>"

CASES = [
    ("colour", RED_CIRCLE, "Red.", True),
    ("colour", RED_CIRCLE, " the circle is RED! ", True),
    ("colour", RED_CIRCLE, "红色。", True),
    ("colour", RED_CIRCLE, "Blue.", False),
    ("colour", RED_CIRCLE, "Red or blue.", False),
    ("colour", RED_CIRCLE, "蓝色", False),
    ("shape", RED_CIRCLE, "A circle.", True),
    ("shape", RED_CIRCLE, "circle", True),
    ("shape", RED_CIRCLE, "圆形。", True),
    ("shape", RED_CIRCLE, "A square.", False),
    ("shape", RED_CIRCLE, "正方形。", False),
    ("position", {"position": "top left"}, "Top left.", True),
    ("position", {"position": "top left"}, "upper left", True),
    ("position", {"position": "top left"}, "左上方。", True),
    ("position", {"position": "top left"}, "At the top.", False),
    ("position", {"position": "top left"}, "top left or bottom right", False),
    ("position", {"position": "centre"}, "In the center", True),
    ("position", {"position": "centre"}, "中间。", True),
    ("position", {"position": "right"}, "On the right.", True),
    ("position", {"position": "right"}, "右边。", True),
    ("position", {"position": "right"}, "右下方。", False),
    ("count", {"of": "all", "count": 3}, "3.", True),
    ("count", {"of": "all", "count": 3}, "Three", True),
    ("count", {"of": "all", "count": 3}, "3。", True),
    ("count", {"of": "all", "count": 3}, "三个。", True),
    ("count", {"of": "all", "count": 3}, "4.", False),
    ("count", {"of": "all", "count": 0}, "0.", True),
    ("yesno", {"answer": "yes"}, "Yes.", True),
    ("yesno", {"answer": "yes"}, "有。", True),
    ("yesno", {"answer": "yes"}, "没有。", False),
    ("yesno", {"answer": "yes"}, "Maybe.", False),
    ("yesno", {"answer": "no"}, "no, there is none", True),
    ("yesno", {"answer": "no"}, "没有。", True),
    ("yesno", {"answer": "no"}, "Yes.", False),
    ("ground", RED_CIRCLE, "<ref>the red circle</ref><box>(100,100),(300,300)</box>", True),
    ("ground", RED_CIRCLE, "<ref>红色的圆形</ref><box>(110,105),(290,310)</box>", True),
    ("ground", RED_CIRCLE, "(100, 100), (300, 300)", True),
    ("ground", RED_CIRCLE, "<box>(500,500),(700,700)</box>", False),
    ("ground", RED_CIRCLE, "<box>(100,100),(200,200)</box>", False),  # IoU 0.25
    ("identify", RED_CIRCLE, "A red circle.", True),
    ("identify", RED_CIRCLE, "一个红色的圆形。", True),
    ("identify", RED_CIRCLE, "红色圆形", True),
    ("identify", RED_CIRCLE, "A red square.", False),
    ("identify", RED_CIRCLE, "A red circle and a blue square.", False),
    ("caption", CAPTION, "A red circle, a blue square and a red circle.", True),
    ("caption", CAPTION, "a blue square, a red circle and a red circle", True),
    ("caption", CAPTION, "一个红色的圆形、一个蓝色的正方形和一个红色的圆形。", True),
    ("caption", CAPTION, "A red circle and a blue square.", False),
    ("caption", CAPTION, "A red circle, a blue square, a red circle and a red circle.", False),
    ("find_all", FIND_ALL, FOUND_EN, True),
    ("find_all", FIND_ALL, FOUND_ZH, True),
    ("find_all", FIND_ALL, FOUND_EN.split("<ref>blue")[0], False),
    ("find_all", FIND_ALL, FOUND_EN + "<ref>blue square</ref><box>(500,500),(700,700)</box>", False),
    ("find_all", FIND_ALL, FOUND_EN.replace("blue square", "blue star"), False),
    ("find_all", FIND_ALL, FOUND_EN.replace("(500,500),(700,700)", "(600,600),(900,900)"), False),
    ("ocr", {"words": ["CAT", "DOG"]}, "CAT DOG", True),
    ("ocr", {"words": ["CAT", "DOG"]}, "cat  dog.", True),
    ("ocr", {"words": ["CAT", "DOG"]}, "DOG CAT", False),
    ("ocr", {"words": ["CAT", "DOG"]}, "CAT", False),
    ("difference", RECOLOUR, "The red circle is blue.", True),
    ("difference", RECOLOUR, "红色的圆形变成了蓝色。", True),
    ("difference", RECOLOUR, "The red circle is green.", False),
    ("difference", RECOLOUR, "The red circle is gone.", False),
    ("difference", REMOVED, "The red circle is gone.", True),
    ("difference", REMOVED, "红色的圆形不见了。", True),
    ("difference", REMOVED, "The blue circle is gone.", False),
    ("difference", ADDED, "A green star was added.", True),
    ("difference", ADDED, "多了一个绿色的星形。", True),
    ("difference", ADDED, "The green star moved.", False),
    ("difference", MOVED, "The red circle moved.", True),
    ("difference", MOVED, "红色的圆形移动了。", True),
    ("difference", MOVED, "The red circle moved and is gone.", False),
]
TARGETS = {kind: target for kind, target, _, _ in CASES}
MALFORMED = [
    "",
    "   ",
    None,
    42,
    "<ref>",
    "<box>(1,2)</box>",
    "<ref>green star</ref><box>(5000,1),(2,3)</box>",
    "<ref></ref><box>(-1,0),(10,10)</box><quad>(1,1)</quad>",
    "\x00\ufffd" + "\U0001f642" * 40,
    "(((((,,,,))))) <box><box></box>",
    "1e999 NaN -3",
]


@pytest.mark.parametrize("kind, target, answer, right", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_scorer_on_hand_written_answers(kind, target, answer, right):
    assert is_correct(kind, target, answer) is right


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_malformed_answers_score_wrong_and_never_raise(kind):
    for answer in MALFORMED:
        assert is_correct(kind, TARGETS[kind], answer) is False


def test_every_generated_answer_reads_back_right():
    for index in range(96):
        for turn in make_sample(21, index).turns:
            target = json.loads(json.dumps(turn.target))  # as read back from truth.jsonl
            assert is_correct(turn.kind, target, turn.answer), (turn.kind, turn.answer)


# ----- reading and prompts ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-eval")
    generate(out, 24, seed=5)
    return out


def test_items_are_the_first_turns(folder):
    task = get_task("synthetic")
    assert isinstance(task, SyntheticTask) and "synthetic" in all_tasks()
    items = task.read(folder).items
    assert task.read(folder / "truth.jsonl").items == items
    truths = [json.loads(line) for line in (folder / "truth.jsonl").read_text(encoding="utf-8").splitlines()]
    records = json.loads((folder / "data.json").read_text(encoding="utf-8"))
    assert [i.id for i in items] == [t["id"] for t in truths]
    for item, truth, record in zip(items, truths, records):
        first = truth["turns"][0]
        assert item.question == first["question"] and item.target == first["target"]
        assert item.meta == {
            "kind": first["kind"],
            "lang": truth["lang"],
            "record_kind": truth["kind"],
            "answer": first["answer"],
        }
        assert item.images == [str((folder / p).resolve()) for p in truth["images"]]
        chat = record["conversations"][0]["value"]
        for path, full in zip(truth["images"], item.images):
            chat = chat.replace(f"<img>{path}</img>", f"<img>{full}</img>")
        assert task.prompt(item, "chat") == chat
        assert task.prompt(item, "base") == "".join(f"<img>{p}</img>" for p in item.images) + item.question + " Answer:"
    assert {i.meta["record_kind"] for i in items} >= {"multiturn", "difference"}


def test_bad_records_name_the_line_or_are_skipped(folder, tmp_path):
    lines = (folder / "truth.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    broken = json.loads(lines[1])
    broken["kind"] = "poetry"
    bad = [lines[0], json.dumps(broken), "{not json", lines[3]]
    path = tmp_path / "truth.jsonl"
    path.write_text("\n".join(bad) + "\n", encoding="utf-8")
    task = SyntheticTask()
    with pytest.raises(DataError, match=r"truth.jsonl:2: .*kind: unknown kind 'poetry'"):
        task.read(path, image_root=folder)
    result = task.read(path, image_root=folder, skip_bad=True)
    assert len(result.items) == 2 and len(result.errors) == 2
    with pytest.raises(DataError, match="image not found"):
        task.read(path)  # the pictures are not beside this file


# ----- summary ------------------------------------------------------------------------------------
def expected_keys() -> set[str]:
    names = ["accuracy", *METRICS.values()]
    return {"en_zh_gap", "count"} | {f"{n}{suffix}" for n in names for suffix in ("", *(f".{g}" for g in LANGS))}


def test_summary_keys_are_stable_and_right_answers_score_100(folder):
    task = SyntheticTask()
    items = task.read(folder).items
    perfect = task.score(items, [i.meta["answer"] for i in items])
    assert set(perfect) == expected_keys() and perfect["count"] == len(items)
    assert perfect["accuracy"] == 100.0 and perfect["en_zh_gap"] == 0.0
    for kind, metric in METRICS.items():
        present = {i.meta["lang"] for i in items if i.meta["kind"] == kind}
        for lang in LANGS:
            assert perfect[f"{metric}.{lang}"] == (100.0 if lang in present else None)
    wrong = task.score(items, [""] * len(items), mode="qwen")
    assert set(wrong) == expected_keys() and wrong["accuracy"] == 0.0
    english_only = task.score(items, [i.meta["answer"] if i.meta["lang"] == "en" else "?" for i in items])
    assert english_only["accuracy.en"] == 100.0 and english_only["accuracy.zh"] == 0.0
    assert english_only["en_zh_gap"] == 100.0


def test_score_of_one_kind_leaves_the_others_none():
    items = [EvalItem("a", [], "q", {"count": 2}, meta={"kind": "count", "lang": "zh"})]
    scores = SyntheticTask().score(items, ["2。"])
    assert scores["count_acc"] == scores["count_acc.zh"] == 100.0 and scores["count_acc.en"] is None
    assert scores["colour_acc"] is None and scores["en_zh_gap"] is None


# ----- end to end ---------------------------------------------------------------------------------
def test_evaluate_on_the_golden_checkpoint(fp32_model, tokenizer, tmp_path):
    data = tmp_path / "data"
    generate(data, 3, seed=8, kinds=("difference", "ground", "find_all"))
    settings = EvalSettings(
        task="synthetic", data=data, model="unused", out=tmp_path / "out", device="cpu", max_new_tokens=4
    )
    result = evaluate(settings, fp32_model, tokenizer, quiet=True)
    assert result.items == 3 and set(result.metrics) == expected_keys()
    rows = [json.loads(line) for line in result.predictions.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"synth-8-{i:06d}" for i in range(3)]
    assert rows[0]["prompt_tokens"] > 2 * 256  # two pictures
    metrics = json.loads((tmp_path / "out" / "synthetic" / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and metrics["metrics"]["count"] == 3
    assert "| synthetic | accuracy |" in (tmp_path / "out" / "summary.md").read_text()
