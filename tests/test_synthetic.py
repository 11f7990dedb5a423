"""The shapes-world generator: determinism, exact ground truth, scene rules, templates,
files the fine-tuning validator accepts, and the ``qwen-vl synth`` command."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen_vl.cli import main
from qwen_vl.data.conversations import KINDS, POSITIONS, SINGLE_IMAGE_KINDS
from qwen_vl.data.scenes import (
    COLOURS,
    MAX_ASPECT,
    MAX_OBJECTS,
    MAX_SIDE,
    MIN_SIDE,
    Scene,
    margin_of,
    normalised_box,
    render_scene,
    sample_scene,
)
from qwen_vl.data.synthetic import generate, make_sample
from qwen_vl.finetune.validation import validate_data
from qwen_vl.grounding import PixelBox

N = 36  # three records of every kind


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate(out, N, seed=3)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truth_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "truth.jsonl").read_text(encoding="utf-8").splitlines()]


def scenes(count: int, seed: int = 0, words: bool | None = None) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, words=words) for _ in range(count)]


# ----- determinism ---------------------------------------------------------------------------
def test_same_seed_same_bytes_any_workers_other_seed_differs(folder, tmp_path):
    generate(tmp_path / "b", N, seed=3, workers=2)
    assert files_of(tmp_path / "b") == files_of(folder)
    generate(tmp_path / "c", 12, seed=4)
    other = files_of(tmp_path / "c")
    mine = files_of(folder)
    assert other["data.json"] != mine["data.json"]
    assert all(other[name] != mine[name] for name in other if name.startswith("images/"))


def test_a_record_does_not_depend_on_n(folder, tmp_path):
    generate(tmp_path / "short", 13, seed=3)
    assert truth_lines(tmp_path / "short") == truth_lines(folder)[:13]
    assert (tmp_path / "short" / "images" / "000012.png").read_bytes() == (
        folder / "images" / "000012.png"
    ).read_bytes()
    assert make_sample(3, 20).truth() == truth_lines(folder)[20]


# ----- files and records ---------------------------------------------------------------------
def test_layout_manifest_and_records(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["n"] == N and manifest["kinds"] == list(KINDS)
    assert manifest["langs"] == ["en", "zh"] and manifest["version"] >= 1
    assert sum(c for per_lang in manifest["counts"].values() for c in per_lang.values()) == N
    assert all(manifest["counts"][kind] in ({"en": 2, "zh": 1}, {"en": 1, "zh": 2}) for kind in KINDS)
    records = json.loads((folder / "data.json").read_text(encoding="utf-8"))
    truths = truth_lines(folder)
    assert len(records) == len(truths) == N
    assert manifest["images"] == len(list((folder / "images").glob("*.png")))
    for i, (record, truth) in enumerate(zip(records, truths)):
        assert record["id"] == truth["id"] == f"synth-3-{i:06d}"
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["user", "assistant"] * len(truth["turns"])
        assert [t["value"] for t in turns[1::2]] == [t["answer"] for t in truth["turns"]]
        pictures = "".join(f"Picture {k}: <img>{p}</img>\n" for k, p in enumerate(truth["images"], 1))
        assert turns[0]["value"] == pictures + truth["turns"][0]["question"]
        assert all("<img>" not in t["value"] for t in turns[1:])
        assert truth["images"] == [f"images/{i:06d}.png", f"images/{i:06d}_b.png"][: len(truth["scenes"])]
        assert (truth["kind"] == "difference") == (len(truth["scenes"]) == 2)
        assert (truth["kind"] == "multiturn") == (len(truth["turns"]) > 1)
        for path, scene in zip(truth["images"], truth["scenes"]):
            assert Image.open(folder / path).size == (scene["width"], scene["height"])


def test_every_record_passes_the_finetune_validator(folder, tokenizer):
    examples, report = validate_data(folder / "data.json", tokenizer, model_max_length=1024, truncation="fail")
    assert len(examples) == N and report.errors == [] and report.counts()["truncated"] == 0
    assert all(len(e.image_paths) in (1, 2) for e in examples)


# ----- ground truth against the pixels --------------------------------------------------------
def test_object_boxes_are_the_bounding_boxes_of_their_pixels(folder):
    checked = 0
    for truth in truth_lines(folder):
        for path, scene in zip(truth["images"], truth["scenes"]):
            pixels = np.asarray(Image.open(folder / path).convert("RGB"))  # (H, W, 3)
            m = margin_of(scene["width"], scene["height"])
            for obj in scene["objects"]:
                x1, y1, x2, y2 = obj["box"]
                ax, ay = max(0, x1 - m // 2), max(0, y1 - m // 2)
                region = pixels[ay : y2 + m // 2, ax : x2 + m // 2]  # (h, w, 3) around the object
                ys, xs = np.nonzero((region == COLOURS[obj["colour"]]).all(axis=-1))
                drawn = (ax + xs.min(), ay + ys.min(), ax + xs.max() + 1, ay + ys.max() + 1)
                assert all(abs(a - b) <= 1 for a, b in zip(drawn, obj["box"])), (path, obj, drawn)
                assert obj["box_1000"] == normalised_box(tuple(obj["box"]), scene["width"], scene["height"])
                b = PixelBox(*obj["box"]).to_normalised(scene["width"], scene["height"])
                assert obj["box_1000"] == [b.x1, b.y1, b.x2, b.y2]
                checked += 1
    assert checked > 3 * N


def test_png_files_decode_to_the_scene_drawn_again(folder):
    for truth in truth_lines(folder)[:12]:
        for path, scene in zip(truth["images"], truth["scenes"]):
            with Image.open(folder / path) as image:
                assert image.format == "PNG" and image.mode == "RGB"
                again = render_scene(Scene.from_json(scene))
                assert np.array_equal(np.asarray(image), np.asarray(again))


def test_each_object_alone_changes_exactly_its_box():
    for scene in scenes(8, seed=1):
        full = np.asarray(render_scene(scene), dtype=np.int16)
        for i, obj in enumerate(scene.objects):
            without = replace(scene, objects=scene.objects[:i] + scene.objects[i + 1 :])
            ys, xs = np.nonzero((np.asarray(render_scene(without), dtype=np.int16) != full).any(axis=-1))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box


def test_word_boxes_hold_all_text_pixels():
    for scene in scenes(12, seed=2, words=True):
        assert 1 <= len(scene.words) <= 2
        diff = np.asarray(render_scene(scene), dtype=np.int16) - np.asarray(
            render_scene(replace(scene, words=())), dtype=np.int16
        )
        ys, xs = np.nonzero((diff != 0).any(axis=-1))
        inside = np.zeros_like(xs, dtype=bool)
        for word in scene.words:
            x1, y1, x2, y2 = word.box
            mine = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
            assert mine.any()
            assert (xs[mine].min(), ys[mine].min(), xs[mine].max() + 1, ys[mine].max() + 1) == word.box
            inside |= mine
            assert 3 <= len(word.text) <= 6 and word.text.isalpha() and word.text.isupper()
            assert (y2 - y1) >= 0.05 * scene.short_side  # cap height of 5% of the short side at least
        assert inside.all()


# ----- scene rules -----------------------------------------------------------------------------
def test_sizes_counts_margins_and_no_overlap():
    for scene in scenes(200, seed=5):
        w, h = scene.width, scene.height
        assert MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE
        assert max(w, h) <= MAX_ASPECT * min(w, h)
        assert 1 <= len(scene.objects) <= MAX_OBJECTS
        m = margin_of(w, h)
        boxes = [o.box for o in scene.objects] + [t.box for t in scene.words]
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            assert m <= x1 < x2 <= w - m and m <= y1 < y2 <= h - m
            for a1, b1, a2, b2 in boxes[k + 1 :]:
                assert x2 + m <= a1 or a2 + m <= x1 or y2 + m <= b1 or b2 + m <= y1
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert min(x2 - x1, y2 - y1) >= 0.05 * scene.short_side


def test_squares_and_rectangles_stay_apart_once_squashed_into_a_square():
    """The model sees every picture resized to a square; a square must still look square there."""
    seen = Counter()
    for scene in scenes(300, seed=8):
        for obj in scene.objects:
            if obj.shape not in ("square", "rectangle"):
                continue
            x1, y1, x2, y2 = obj.box
            squashed = ((x2 - x1) / scene.width) / ((y2 - y1) / scene.height)
            long_over_short = max(squashed, 1 / squashed)
            seen[obj.shape] += 1
            if obj.shape == "square":
                assert long_over_short <= 1.3, (scene, obj)
            else:
                assert long_over_short >= 1.5, (scene, obj)
    assert seen["square"] > 20 and seen["rectangle"] > 20


def test_backgrounds_never_take_a_shape_colour():
    shape_colours = np.array(list(COLOURS.values()), dtype=np.int16)  # (C, 3)
    kinds = Counter()
    for scene in scenes(40, seed=6):
        kinds[scene.background.kind] += 1
        empty = np.asarray(render_scene(replace(scene, objects=(), words=())), dtype=np.int32)  # (H, W, 3)
        packed = np.unique((empty[..., 0] << 16) | (empty[..., 1] << 8) | empty[..., 2])  # (K,)
        colours = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=-1)  # (K, 3)
        distance = np.abs(colours[:, None, :] - shape_colours[None, :, :]).max(axis=-1)  # (K, C)
        assert distance.min() > 60
    assert set(kinds) == {"plain", "gradient_h", "gradient_v", "noise"}


# ----- conversations -------------------------------------------------------------------------
def samples(count: int, seed: int = 9):
    return [make_sample(seed, i) for i in range(count)]


def unique(scene: dict, colour: str | None, shape: str | None) -> bool:
    found = [o for o in scene["objects"] if colour in (None, o["colour"]) and shape in (None, o["shape"])]
    return len(found) == 1


def test_questions_refer_only_to_unique_objects_and_state_the_truth():
    answers = Counter()
    ocr = 0
    for sample in samples(240):
        truth = sample.truth()
        scene = truth["scenes"][0]
        for turn in truth["turns"]:
            t = turn["target"]
            if turn["kind"] in ("ground", "position"):
                assert unique(scene, t["colour"], t["shape"])
            if turn["kind"] == "colour":
                assert unique(scene, None, t["shape"])
            if turn["kind"] == "shape":
                assert unique(scene, t["colour"], None)
            if turn["kind"] in ("ground", "identify"):
                assert t["box"] == scene["objects"][t["object"]]["box_1000"]
            if turn["kind"] == "position":
                x1, y1, x2, y2 = scene["objects"][t["object"]]["box"]
                column = int(3 * (x1 + x2) / 2 / scene["width"])
                row = int(3 * (y1 + y2) / 2 / scene["height"])
                assert POSITIONS[3 * row + column] == t["position"]
            if turn["kind"] == "count":
                key = t["of"]
                expected = sum(key == "all" or o[key] == t[key] for o in scene["objects"])
                assert t["count"] == expected
            if turn["kind"] == "yesno":
                answers[t["answer"]] += 1
                assert (t["answer"] == "yes") == any(
                    (o["colour"], o["shape"]) == (t["colour"], t["shape"]) for o in scene["objects"]
                )
            if turn["kind"] == "ocr":
                words = sorted(scene["words"], key=lambda w: w["box"][0])
                if len(words) == 2 and words[1]["box"][0] < words[0]["box"][2]:  # one above the other
                    words.sort(key=lambda w: w["box"][1])
                assert turn["answer"] == " ".join(w["text"] for w in words)
                ocr += 1
            if turn["kind"] == "find_all":
                assert sorted(o["box"] for o in t["objects"]) == sorted(o["box_1000"] for o in scene["objects"])
                centres = [o["box"][0] + o["box"][2] for o in t["objects"]]
                assert all(a <= b + 2 for a, b in zip(centres, centres[1:]))  # left to right
    assert answers["yes"] > 0 and answers["no"] > 0 and ocr > 0


def test_difference_pairs_differ_by_exactly_the_stated_change():
    seen = Counter()
    for sample in [s for s in samples(480, seed=10) if s.kind == "difference"]:
        first, second = (s.to_json()["objects"] for s in sample.scenes)
        change = sample.change
        seen[change["type"]] += 1
        strip = [{k: o[k] for k in ("shape", "colour", "box")} for o in first]
        after = [{k: o[k] for k in ("shape", "colour", "box")} for o in second]
        i = change["object"]
        if change["type"] == "added":
            assert after[:-1] == strip and len(after) == i + 1
            assert (after[i]["colour"], after[i]["shape"]) == (change["colour"], change["shape"])
            continue
        assert unique(sample.truth()["scenes"][0], change["colour"], change["shape"])
        if change["type"] == "removed":
            assert after == strip[:i] + strip[i + 1 :]
            continue
        assert len(after) == len(strip)
        assert [o for k, o in enumerate(after) if k != i] == [o for k, o in enumerate(strip) if k != i]
        if change["type"] == "colour":
            assert after[i] == {**strip[i], "colour": change["new_colour"]} and change["new_colour"] != change["colour"]
        else:
            assert after[i]["box"] != strip[i]["box"] and change["box_after"] == after[i]["box"]
    assert set(seen) == {"colour", "removed", "added", "moved"}


def test_templates_in_both_languages():
    by_kind = {}
    for sample in samples(48, seed=12):
        by_kind.setdefault((sample.kind, sample.lang), sample)
    caption = by_kind["caption", "en"].turns[0].answer
    assert caption[0].isupper() and caption.endswith(".")
    zh = by_kind["caption", "zh"].turns[0].answer
    assert zh.startswith("一个") and zh.endswith("。")
    ground = by_kind["ground", "zh"].turns[0]
    assert ground.question.startswith("框出图中") and ground.answer.startswith("<ref>") and "的" in ground.answer
    assert by_kind["ground", "en"].turns[0].answer.startswith("<ref>the ")
    assert by_kind["yesno", "zh"].turns[0].answer in ("有。", "没有。")
    assert by_kind["difference", "en"].turns[0].question == "What is different in Picture 2?"
    assert all(k in SINGLE_IMAGE_KINDS for k in (t.kind for t in by_kind["multiturn", "en"].turns))
    assert 2 <= len(by_kind["multiturn", "zh"].turns) <= 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        generate("unused", 0, 1)
    with pytest.raises(ValueError, match="unknown kind"):
        make_sample(1, 0, kinds=("caption", "poetry"))
    with pytest.raises(ValueError, match="unknown language"):
        make_sample(1, 0, langs=("fr",))


def test_cli_writes_the_chosen_kinds_and_languages(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--n", "4", "--seed", "2", "--langs", "zh", "--kinds", "ocr,count"]) == 0
    assert "4 records, 4 images" in capsys.readouterr().out
    truths = truth_lines(out)
    assert [t["kind"] for t in truths] == ["ocr", "count", "ocr", "count"]
    assert {t["lang"] for t in truths} == {"zh"}
    assert main(["synth", "--out", str(out), "--n", "2", "--kinds", "poetry"]) == 2
    assert "--kinds: unknown poetry" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--n", "0", "--quiet"]) == 2


def test_multiturn_records_ask_the_chosen_number_of_questions(tmp_path):
    from qwen_vl.data.synthetic import generate

    manifest = generate(tmp_path, 12, seed=3, kinds=["multiturn"], langs=["en"], turns=(4, 6))
    assert manifest["multiturn_turns"] == [4, 6]
    records = json.loads((tmp_path / "data.json").read_text(encoding="utf-8"))
    asked = [sum(t["from"] == "user" for t in r["conversations"]) for r in records]
    assert min(asked) >= 4 and max(asked) <= 6 and len(set(asked)) > 1
    with pytest.raises(ValueError, match="turns must satisfy"):
        generate(tmp_path / "bad", 1, kinds=["multiturn"], turns=(3, 2))
    assert main(["synth", "--out", str(tmp_path / "x"), "--n", "1", "--turns", "two", "--quiet"]) == 2


def test_written_files_get_a_new_files_usual_mode(tmp_path):
    import os

    from qwen_vl.data.synthetic import generate

    generate(tmp_path, 2, seed=1)
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "data.json", tmp_path / "truth.jsonl", next((tmp_path / "images").iterdir())):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "images").glob(".*.tmp"))
