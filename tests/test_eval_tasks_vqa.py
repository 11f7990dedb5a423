"""Captioning, general VQA and text VQA tasks: readers on the benchmarks' real layouts, prompts,
scores in both modes, and data errors naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from qwen_vl.eval.tasks import caption, general_vqa, text_vqa
from qwen_vl.eval.tasks.base import Task
from qwen_vl.finetune.records import DataError


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (200, 10, 10)).save(path)
    return path


def write_json(path: Path, records: list[Any] | dict[str, Any], key: str | None = None, **head: Any) -> Path:
    """Records one a line: with ``key``, record i is on line 3 + i; without, on line 2 + i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(records, dict):
        body = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in records.items())
        inner = "{\n" + body + "\n}"
    else:
        inner = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]"
    if key is None:
        text = inner
    else:
        text = '{"info": ' + json.dumps(head) + ",\n" + json.dumps(key) + ": " + inner + "}"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def answers(*texts: str) -> list[dict[str, Any]]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


NUMBER_ANSWERS = ["two"] * 3 + ["2"] * 3 + ["three"] * 4


def vqav2(tmp_path: Path) -> Path:
    for image_id in (1, 2):
        png(tmp_path / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    questions = [
        {"image_id": 1, "question": "How many dogs?", "question_id": 10},
        {"image_id": 2, "question": "Is it red?", "question_id": 20},
    ]
    annotations = [
        {"question_id": 10, "image_id": 1, "answer_type": "number", "answers": answers(*NUMBER_ANSWERS)},
        {"question_id": 20, "image_id": 2, "answer_type": "yes/no", "answers": answers(*["yes"] * 10)},
    ]
    write_json(tmp_path / "v2_mscoco_val2014_annotations.json", annotations, "annotations")
    return write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions, "questions")


def test_registries_name_their_classes() -> None:
    for module in (caption, general_vqa, text_vqa):
        for name, cls in module.TASKS.items():
            assert issubclass(cls, Task) and cls.name == name and name == name.lower() and " " not in name
            assert cls.metric and cls.max_new_tokens > 0


def test_vqav2_reads_prompts_and_scores_both_modes(tmp_path: Path) -> None:
    questions = vqav2(tmp_path)
    task = general_vqa.VQAv2Val()
    for data in (questions, tmp_path):  # the questions file or the folder holding both
        result = task.read(data)
        assert [i.id for i in result.items] == ["10", "20"] and result.errors == []
    first = result.items[0]
    assert first.images == [str((tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").resolve())]
    assert first.meta["answer_type"] == "number" and first.source.endswith(":3")
    assert task.prompt(first, "base") == f"<img>{first.images[0]}</img>How many dogs? Answer:"
    assert task.prompt(first, "chat") == (
        f"Picture 1: <img>{first.images[0]}</img>\nHow many dogs?\nAnswer the question using a single word or phrase."
    )
    canonical = task.score(result.items, ["2", "Yes"])
    assert list(canonical)[0] == "vqa_accuracy"
    assert canonical["vqa_accuracy"] == pytest.approx(50.0)
    assert canonical["vqa_accuracy[number]"] == pytest.approx(100.0) and canonical["vqa_accuracy[yes/no]"] == 0.0
    qwen = task.score(result.items, ["2", "Yes"], mode="qwen")
    assert qwen["vqa_accuracy"] == pytest.approx(95.0) and qwen["count"] == 2
    with pytest.raises(ValueError, match="mode"):
        task.score(result.items, ["2", "Yes"], mode="other")
    with pytest.raises(ValueError, match="predictions"):
        task.score(result.items, ["2"])


def test_vqav2_data_errors_name_file_line_and_field(tmp_path: Path) -> None:
    questions = vqav2(tmp_path)
    task = general_vqa.VQAv2Val()
    (tmp_path / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(DataError) as err:
        task.read(questions)
    assert (err.value.file, err.value.line, err.value.field, err.value.record_id) == (
        str(questions),
        4,
        "image_id",
        "20",
    )
    assert "image not found" in str(err.value)
    result = task.read(questions, skip_bad=True)
    assert [i.id for i in result.items] == ["10"] and [e.line for e in result.errors] == [4]

    text = questions.read_text().replace('"question": "How many dogs?", ', "")
    questions.write_text(text)
    with pytest.raises(DataError) as err:
        task.read(questions)
    assert (err.value.line, err.value.field, err.value.message) == (3, "question", "missing field")

    questions.write_text(text.replace('"question_id": 20}', '"question_id": 20,}'))
    with pytest.raises(DataError) as err:
        task.read(questions, skip_bad=True)  # a broken document cannot be skipped
    assert err.value.line == 4 and err.value.column is not None and "invalid JSON" in err.value.message

    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DataError, match="file not found"):
        task.read(tmp_path)


def test_question_without_annotation(tmp_path: Path) -> None:
    questions = vqav2(tmp_path)
    write_json(tmp_path / "v2_mscoco_val2014_annotations.json", [], "annotations")
    with pytest.raises(DataError) as err:
        general_vqa.VQAv2Val().read(questions)
    assert err.value.field == "question_id" and err.value.line == 3


def test_vqav2_jsonl_takes_answers_from_annotations_beside(tmp_path: Path) -> None:
    vqav2(tmp_path)
    data = write_jsonl(
        tmp_path / "vqav2_val.jsonl",
        [
            {
                "image": "val2014/COCO_val2014_000000000001.jpg",
                "question": "How many?",
                "question_id": 10,
                "answer": "2",
            },
            '{"image": broken',
            {"image": "val2014/COCO_val2014_000000000002.jpg", "question": "Red?", "question_id": 21, "answer": ["a"]},
        ],
    )
    task = general_vqa.VQAv2Val()
    with pytest.raises(DataError) as err:
        task.read(data)
    assert (err.value.line, err.value.column) == (2, 11)
    result = task.read(data, skip_bad=True)
    assert [i.id for i in result.items] == ["10", "21"] and [e.line for e in result.errors] == [2]
    assert result.items[0].target == answers(*NUMBER_ANSWERS) and result.items[1].target == ["a"]
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DataError) as err:
        task.read(data.with_name("x.jsonl"))
    assert "file not found" in str(err.value)
    write_jsonl(
        data, [{"image": "val2014/COCO_val2014_000000000001.jpg", "question": "q", "question_id": 1, "answer": "2"}]
    )
    with pytest.raises(DataError) as err:
        task.read(data)
    assert err.value.field == "answer" and err.value.line == 1


def test_vqav2_testdev_has_no_score_and_okvqa_reads_its_files(tmp_path: Path) -> None:
    png(tmp_path / "test2015" / "COCO_test2015_000000000007.jpg")
    write_json(
        tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
        [{"image_id": 7, "question": "What?", "question_id": 70}],
        "questions",
    )
    task = general_vqa.VQAv2TestDev()
    items = task.read(tmp_path).items
    assert items[0].target is None
    assert task.score(items, ["x"])["vqa_accuracy"] is None

    png(tmp_path / "ok" / "val2014" / "COCO_val2014_000000000003.jpg")
    write_json(
        tmp_path / "ok" / "OpenEnded_mscoco_val2014_questions.json",
        [{"image_id": 3, "question": "Q", "question_id": 5}],
        "questions",
    )
    write_json(
        tmp_path / "ok" / "mscoco_val2014_annotations.json",
        [{"question_id": 5, "answers": answers(*["tea"] * 10)}],
        "annotations",
    )
    okvqa = general_vqa.OKVQAVal()
    items = okvqa.read(tmp_path / "ok").items
    assert okvqa.score(items, ["tea"]) == {"vqa_accuracy": 100.0, "count": 1}


def test_vizwiz_val_layout(tmp_path: Path) -> None:
    png(tmp_path / "val" / "VizWiz_val_00000000.jpg")
    records = [
        {
            "image": "VizWiz_val_00000000.jpg",
            "question": "What is this?",
            "answer_type": "other",
            "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10,
            "answerable": 1,
        },
        {"image": "VizWiz_val_00000001.jpg", "question": "What?", "answers": []},
    ]
    data = write_json(tmp_path / "Annotations" / "val.json", records)
    task = general_vqa.VizWizVal()
    result = task.read(data, skip_bad=True)
    assert [i.id for i in result.items] == ["VizWiz_val_00000000.jpg"]
    assert (result.errors[0].line, result.errors[0].field) == (3, "answers")
    assert task.score(result.items, ["Soup."])["vqa_accuracy"] == 0.0  # all answers equal: nothing normalised
    assert task.score(result.items, ["Soup."], mode="qwen")["vqa_accuracy"] == 100.0


def test_gqa_testdev_balanced(tmp_path: Path) -> None:
    png(tmp_path / "images" / "n1.jpg")
    questions = {
        "201": {
            "imageId": "n1",
            "question": "What is he holding?",
            "answer": "tennis racket",
            "types": {"structural": "query"},
        },
        "202": {"imageId": "n1", "question": "Is it sunny?", "answer": "yes", "types": {"structural": "verify"}},
        "203": {"imageId": "n2", "question": "Where?", "answer": "park"},
    }
    data = write_json(tmp_path / "testdev_balanced_questions.json", questions)
    task = general_vqa.GQATestDev()
    with pytest.raises(DataError) as err:
        task.read(data)
    assert (err.value.line, err.value.field, err.value.record_id) == (4, "imageId", "203")
    items = task.read(data, skip_bad=True).items
    assert [i.id for i in items] == ["201", "202"]
    assert task.score(items, ["Tennis racket", "yes"]) == {
        "accuracy": 100.0,
        "count": 2,
        "accuracy[query]": 100.0,
        "accuracy[verify]": 100.0,
    }
    assert task.score(items, ["Tennis racket", "yes"], mode="qwen")["accuracy"] == 50.0


def test_textvqa_val(tmp_path: Path) -> None:
    png(tmp_path / "train_images" / "abc.jpg")
    record = {
        "question_id": 34602,
        "question": "what brand?",
        "image_id": "abc",
        "answers": ["Nous"] * 8 + ["nous"] * 2,
    }
    data = write_json(tmp_path / "TextVQA_0.5.1_val.json", [record], "data", dataset_type="val")
    task = text_vqa.TextVQAVal()
    items = task.read(data).items
    assert items[0].id == "34602" and items[0].images[0].endswith("train_images/abc.jpg")
    assert task.score(items, ["nous"])["vqa_accuracy"] == 100.0  # canonical normalises the answers
    # Qwen-VL's copy never lower-cases the answers: "nous" matches 2 of 10 -> (8 * 2/3 + 2 * 1/3) / 10.
    assert task.score(items, ["Nous"], mode="qwen")["vqa_accuracy"] == pytest.approx(60.0)
    record["answers"] = "x"
    write_json(data, [dict(record, answers=[1])], "data")
    with pytest.raises(DataError) as err:
        task.read(data)
    assert (err.value.line, err.value.field) == (3, "answers[0]")


def test_docvqa_val_anls(tmp_path: Path) -> None:
    png(tmp_path / "documents" / "p1.png")
    records = [{"questionId": 1, "question": "Code?", "image": "documents/p1.png", "answers": ["ac"]}]
    data = write_json(tmp_path / "val_v1.0.json", records, "data")
    task = text_vqa.DocVQAVal()
    items = task.read(data).items
    assert task.max_new_tokens == 100 and items[0].images[0].endswith("documents/p1.png")
    assert task.score(items, ["ab"]) == {"anls": 0.0, "count": 1}
    assert task.score(items, ["ab"], mode="qwen") == {"anls": 50.0, "count": 1}


def test_chartqa_relaxed_accuracy_and_jsonl(tmp_path: Path) -> None:
    png(tmp_path / "png" / "c1.png")
    data = write_json(tmp_path / "test_human.json", [{"imgname": "c1.png", "query": "Value?", "label": "10"}])
    task = text_vqa.ChartQAHuman()
    items = task.read(tmp_path).items
    assert items[0].id == "test_human-0" and items[0].target == "10"
    assert task.score(items, ["10.52"])["relaxed_accuracy"] == 0.0
    assert task.score(items, ["10.52"], mode="qwen")["relaxed_accuracy"] == 100.0
    jsonl = write_jsonl(
        tmp_path / "test_human.jsonl", [{"image": "png/c1.png", "question": "V?", "question_id": 0, "answer": "10"}]
    )
    assert task.read(jsonl).items[0].target == "10"
    write_json(data, [{"imgname": "c1.png", "query": "Value?"}])
    with pytest.raises(DataError) as err:
        task.read(data)
    assert (err.value.line, err.value.field) == (2, "label")


def ai2d(tmp_path: Path) -> Path:
    root = tmp_path / "ai2d"
    png(root / "images" / "4.png")
    question = {"abcLabel": False, "answerTexts": ["sun", "moon", "star"], "correctAnswer": 1, "questionId": "4.png-0"}
    write_json(root / "questions" / "4.png.json", {"Which is lit at night?": question}, "questions", imageName="4.png")
    (root / "ai2d_test_ids.csv").write_text("4\n9\n")
    return root


def test_ai2d_test_layout_prompts_and_modes(tmp_path: Path) -> None:
    root = ai2d(tmp_path)
    task = text_vqa.AI2DTest()
    with pytest.raises(DataError) as err:
        task.read(root)
    assert (err.value.file, err.value.line, err.value.record_id) == (str(root / "ai2d_test_ids.csv"), 2, "9")
    result = task.read(root, skip_bad=True)
    (item,) = result.items
    assert (item.id, item.target, item.options, item.source) == (
        "4.png-0",
        "B",
        ["sun", "moon", "star"],
        f"{root / 'questions' / '4.png.json'}:3",
    )
    image = item.images[0]
    assert task.prompt(item, "base") == f"<img>{image}</img>Which is lit at night?\nA. sun\nB. moon\nC. star\nAnswer:"
    assert task.prompt(item, "chat").endswith(
        "C. star\nAnswer with the option's letter from the given choices directly."
    )
    assert task.score([item], ["The answer is B"])["accuracy"] == 100.0
    assert task.score([item], ["The answer is B"], mode="qwen")["accuracy"] == 0.0
    assert task.score([item], [" b "], mode="qwen")["accuracy"] == 100.0


def test_ai2d_bad_correct_answer(tmp_path: Path) -> None:
    root = ai2d(tmp_path)
    (root / "ai2d_test_ids.csv").write_text("4\n")
    question = {"answerTexts": ["sun"], "correctAnswer": 3, "questionId": "4.png-0"}
    write_json(root / "questions" / "4.png.json", {"Q?": question}, "questions")
    with pytest.raises(DataError) as err:
        text_vqa.AI2DTest().read(root)
    assert (err.value.line, err.value.field, err.value.record_id) == (3, "correctAnswer", "4.png-0")


def test_ocrvqa_dataset_json_splits(tmp_path: Path) -> None:
    png(tmp_path / "images" / "B1.jpg")
    books = {
        "B1": {
            "imageURL": "http://x/B1.jpg",
            "questions": ["Who wrote it?", "Is it a novel?"],
            "answers": ["Ann Lee", "No"],
            "split": 3,
        },
        "B2": {"imageURL": "http://x/B2.jpg", "questions": ["Title?"], "answers": ["T"], "split": 1},
        "B3": {"imageURL": "http://x/B3.gif", "questions": ["Title?"], "answers": ["T"], "split": 3},
    }
    data = write_json(tmp_path / "dataset.json", books)
    task = text_vqa.OCRVQATest()
    with pytest.raises(DataError) as err:
        task.read(data)
    assert (err.value.line, err.value.field, err.value.record_id) == (4, "imageURL", "B3")
    assert "B3.gif" in err.value.message
    result = task.read(data, skip_bad=True)
    assert [i.id for i in result.items] == ["B1-0", "B1-1"] and len(result.errors) == 1
    assert task.score(result.items, ["ann lee ", "Yes"]) == {"accuracy": 50.0, "count": 2}
    assert text_vqa.OCRVQAVal().read(data, skip_bad=True).items == []


def test_nocaps_val_cider_overall_and_by_domain(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        png(tmp_path / "val" / name)
    images = [
        {"id": 0, "file_name": "a.jpg", "domain": "in-domain"},
        {"id": 1, "file_name": "b.jpg", "domain": "in-domain"},
    ]
    annotations = [
        {"image_id": 0, "id": 0, "caption": "A dog runs fast."},
        {"image_id": 1, "id": 1, "caption": "Two cats sleep."},
    ]
    data = tmp_path / "nocaps_val_4500_captions.json"
    data.write_text(json.dumps({"images": images, "annotations": annotations}, indent=1))
    task = caption.NoCapsVal()
    result = task.read(data, image_root=tmp_path / "val")
    assert [i.target for i in result.items] == [["A dog runs fast."], ["Two cats sleep."]]
    item = result.items[0]
    assert task.prompt(item, "base") == f"<img>{item.images[0]}</img>Describe the image in English:"
    assert task.prompt(item, "chat") == f"Picture 1: <img>{item.images[0]}</img>\nDescribe the image in one sentence."
    # Each image's n-grams are its own (idf log 2): the exact 4-word caption scores 10 (x100) for each n, the other 0.
    scores = task.score(result.items, ["a dog runs fast", "zebra"])
    assert scores == pytest.approx({"cider": 500.0, "count": 2, "cider[in-domain]": 500.0})
    assert task.score(result.items, ["a dog runs fast", "zebra"], mode="qwen")["cider"] == pytest.approx(500.0)
    with pytest.raises(DataError) as err:
        task.read(data)  # images are not beside the file
    assert err.value.field == "file_name" and err.value.record_id == "0"


def test_flickr30k_karpathy_and_qwen_coco_format(tmp_path: Path) -> None:
    png(tmp_path / "flickr30k-images" / "1.jpg")
    images = [
        {"filename": "1.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "A man.", "tokens": ["a", "man"]}]},
        {"filename": "2.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "B."}]},
        {"filename": "3.jpg", "imgid": 2, "split": "test", "sentences": [{"tokens": []}]},
    ]
    data = write_json(tmp_path / "dataset_flickr30k.json", images, "images")
    task = caption.Flickr30KTest()
    with pytest.raises(DataError) as err:
        task.read(data)
    assert (err.value.line, err.value.field) == (5, "sentences[0].raw")
    result = task.read(data, skip_bad=True)
    assert [(i.id, i.target) for i in result.items] == [("0", ["A man."])]

    coco = {"images": [{"id": 7, "image": "flickr30k-images/1.jpg"}], "annotations": [{"image_id": 8, "caption": "x"}]}
    qwen_file = tmp_path / "flickr30k_karpathy_test.json"
    qwen_file.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="no caption"):
        task.read(qwen_file)
    coco["annotations"] = [{"image_id": 7, "caption": "A man."}]
    qwen_file.write_text(json.dumps(coco))
    assert [i.id for i in task.read(qwen_file).items] == ["7"]
