"""Answer regions, their look targets and the look loss of ``finetune --look-loss-weight``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_finetune_train import make_data, settings

from qwen_vl.data.synthetic import generate
from qwen_vl.finetune.dataset import SupervisedDataset, collate
from qwen_vl.finetune.look_loss import LookLoss
from qwen_vl.finetune.regions import LookTarget, box_cells
from qwen_vl.finetune.trainer import train
from qwen_vl.finetune.validation import DataValidationError, validate_data
from qwen_vl.model.rotary import apply_rotary

ANSWER = "A red circle and a blue square."
SECOND = ANSWER.index(" and")  # 12: from here the answer turns to the square
CIRCLE, SQUARE = [0, 0, 500, 500], [500, 500, 1000, 1000]


def _write(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), "white").save(folder / name)
    path = folder / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _record(regions, *, pictures=("a.png",), rid="r1") -> dict:
    user = "".join(f"Picture {k}: <img>{p}</img>\n" for k, p in enumerate(pictures, 1)) + "What is there?"
    answer = {"from": "assistant", "value": ANSWER, "regions": regions}
    return {"id": rid, "conversations": [{"from": "user", "value": user}, answer]}


def test_box_cells_are_the_cells_whose_centres_lie_in_the_box():
    assert box_cells([0, 0, 1000, 1000], 16) == list(range(256))
    assert box_cells([0, 0, 125, 62], 16) == [0, 1]  # centres at 31.25 and 93.75 across, 31.25 down
    assert box_cells([500, 500, 510, 510], 16) == [8 * 16 + 8]  # smaller than a cell: the cell under it


def test_each_answer_token_looks_at_the_region_that_covers_it(tokenizer, tmp_path):
    regions = [{"image": 1, "box": CIRCLE}, {"image": 1, "box": SQUARE, "start": SECOND}]
    examples, _ = validate_data(_write(tmp_path, [_record(regions)]), tokenizer)
    (example,) = examples
    ids, labels = example.input_ids, example.labels
    img = ids.index(tokenizer.img_start_id)
    circle = {img + 1 + c for c in box_cells(CIRCLE, 16)}
    square = {img + 1 + c for c in box_cells(SQUARE, 16)}
    answer_positions = [p for p, label in enumerate(labels) if label != -100][:-1]  # without <|im_end|>
    assert [t.query for t in example.look] == [p - 1 for p in answer_positions]
    text = ""
    for target, p in zip(example.look, answer_positions):
        expected = circle if len(text.encode()) < SECOND else square
        assert set(target.keys) == expected, (text, tokenizer.decode([ids[p]]))
        text += tokenizer.decode([ids[p]])
    assert text == ANSWER
    assert sum(t.weight for t in example.look) == pytest.approx(1.0)
    item = SupervisedDataset(examples, 32)[0]
    assert collate([item, {**item, "look": ()}], pad_id=0)["look"] == [example.look, ()]


@pytest.mark.parametrize(
    ("regions", "field", "message"),
    [
        ([{"image": 2, "box": CIRCLE}], "conversations[1].regions", "picture 2, but the conversation shows 1"),
        ([{"image": 0, "box": CIRCLE}], "conversations[1].regions[0].image", "picture number from 1"),
        ([{"image": 1, "box": [0, 0, 1001, 5]}], "conversations[1].regions[0].box", "<= 1000"),
        ([{"image": 1, "box": [9, 0, 5, 5]}], "conversations[1].regions[0].box", "x1 <= x2"),
        ([{"image": 1, "box": [0, 0, 5]}], "conversations[1].regions[0].box", "4 integers"),
        ([{"image": 1, "box": CIRCLE, "start": 99}], "conversations[1].regions[0].start", "0 to 30"),
        ([{"image": 1, "box": CIRCLE, "where": 1}], "conversations[1].regions[0].where", "unknown field"),
        ({"image": 1}, "conversations[1].regions", "expected an array"),
    ],
)
def test_bad_regions_are_named(tokenizer, tmp_path, regions, field, message):
    with pytest.raises(DataValidationError) as caught:
        validate_data(_write(tmp_path, [_record(regions)]), tokenizer)
    (error,) = caught.value.report.errors
    assert error.field == field and message in error.message and error.record_id == "r1"


def test_regions_on_a_question_are_refused(tokenizer, tmp_path):
    record = _record([])
    record["conversations"][0]["regions"] = [{"image": 1, "box": CIRCLE}]
    with pytest.raises(DataValidationError) as caught:
        validate_data(_write(tmp_path, [record]), tokenizer)
    assert "regions belong to assistant turns" in str(caught.value.report.errors[0])


def test_synthetic_answers_carry_the_regions_of_their_objects(tokenizer, tmp_path):
    generate(tmp_path, 24, seed=5)
    data = json.loads((tmp_path / "data.json").read_text())
    truth = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    seen = set()
    for record, facts in zip(data, truth):
        answers = record["conversations"][1::2]
        for answer, turn in zip(answers, facts["turns"]):
            kind, target, regions = turn["kind"], turn["target"], answer.get("regions", [])
            objects = facts["scenes"][0]["objects"]
            seen.add(kind)
            if kind in ("colour", "shape", "position", "ground", "identify"):
                assert regions == [{"image": 1, "box": objects[target["object"]]["box_1000"]}]
            elif kind == "find_all":
                assert [r["box"] for r in regions] == [o["box"] for o in target["objects"]]
                assert all(answer["value"][r.get("start", 0) :].startswith("<ref>") for r in regions)
            elif kind == "caption":
                assert len(regions) == len(objects) and regions[0].get("start", 0) == 0
            elif kind == "yesno" and target["answer"] == "no":
                assert regions == []
            elif kind == "difference" and target["type"] == "added":
                second = facts["scenes"][1]["objects"]
                assert regions == [{"image": 2, "box": second[target["object"]]["box_1000"]}]
    assert {"caption", "find_all", "ground", "difference"} <= seen
    examples, _ = validate_data(tmp_path / "data.json", tokenizer)
    assert sum(1 for e in examples if e.look) >= 20


def test_look_loss_is_minus_log_attention_mass_on_the_targets(fp32_model):
    torch.manual_seed(0)
    look = LookLoss(fp32_model, layer=1, heads=2)
    ids = torch.randint(1000, 2000, (1, 10))
    captured = {}
    attn = fp32_model.transformer.h[1].attn
    weights = []

    def record_weights(module, args, output):  # the same attention, the slow way
        x, inputs = args
        captured["x"], captured["inputs"] = x, inputs

    handle = attn.register_forward_hook(record_weights)
    look.arm([(LookTarget(query=6, keys=(2, 3), weight=0.5), LookTarget(query=9, keys=(0,), weight=0.5))])
    fp32_model(input_ids=ids)
    loss = look.take()
    handle.remove()
    look.remove()
    x, inputs = captured["x"], captured["inputs"]
    H, D = attn.num_heads, attn.head_dim
    q, k, _ = attn.c_attn(x).split(H * D, dim=-1)
    q = apply_rotary(q.view(1, 10, H, D), inputs.cos, inputs.sin)[0, :, :2]
    k = apply_rotary(k.view(1, 10, H, D), inputs.cos, inputs.sin)[0, :, :2]
    for query, keys in ((6, [2, 3]), (9, [0])):
        probs = torch.softmax(torch.einsum("hd,thd->ht", q[query], k[: query + 1]) / D**0.5, dim=-1)  # (2, t)
        weights.append(-torch.log(probs[:, keys].sum(-1)).mean())
    assert loss.item() == pytest.approx((0.5 * weights[0] + 0.5 * weights[1]).item(), rel=1e-5)
    assert look.take() is None  # one score per armed pass


def test_look_loss_settings_are_checked(fp32_model, checkpoint_dir, tmp_path):
    with pytest.raises(ValueError, match="look-loss-layer must be within 0-"):
        LookLoss(fp32_model, layer=99, heads=1)
    with pytest.raises(ValueError, match="look-loss-heads must be within 1-"):
        LookLoss(fp32_model, layer=0, heads=99)
    data = make_data(tmp_path / "plain")  # no regions
    with pytest.raises(ValueError, match="no answer in the data gives 'regions'"):
        train(settings(checkpoint_dir, data, tmp_path / "out", look_loss_weight=1.0, max_steps=1), quiet=True)
    with pytest.raises(ValueError, match="look-loss-heads must be at least 1"):
        settings(checkpoint_dir, data, tmp_path / "out", look_loss_heads=0)


@pytest.mark.slow
def test_training_with_the_look_loss_teaches_the_layer_where_to_look(checkpoint_dir, tmp_path):
    folder = tmp_path / "data"
    generate(folder, 8, seed=11, kinds=["colour", "ground", "identify"])
    common = dict(batch_size=4, learning_rate=3e-3, weight_decay=0.0, look_loss_layer=0, look_loss_heads=1)
    result = train(
        settings(checkpoint_dir, folder / "data.json", tmp_path / "out", max_steps=12, look_loss_weight=5.0, **common),
        quiet=True,
    )
    assert len(result.look_losses) == 12 and all(torch.isfinite(torch.tensor(result.look_losses)))
    assert sum(result.look_losses[-3:]) / 3 < 0.7 * sum(result.look_losses[:3]) / 3
    plain = train(settings(checkpoint_dir, folder / "data.json", tmp_path / "plain", max_steps=2, **common), quiet=True)
    assert plain.look_losses == []
