"""Grounding, multiple-choice and MME tasks on fixtures in the benchmarks' layouts, and the judge client."""

from __future__ import annotations

import json
import os
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from qwen_vl.eval import judge as judge_mod
from qwen_vl.eval.judge import JudgeConfig, JudgeError, JudgeItem, chat_completion, judge, parse_scores, summarize
from qwen_vl.eval.tasks.grounding import TASKS as GROUNDING_TASKS
from qwen_vl.eval.tasks.grounding import load_refs
from qwen_vl.eval.tasks.mme import TASKS as MME_TASKS
from qwen_vl.eval.tasks.multiple_choice import TASKS as MC_TASKS
from qwen_vl.finetune.records import DataError


def png(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def write_jsonl(path: Path, records: list, bad_line: str | None = None) -> Path:
    lines = [json.dumps(r) for r in records] + ([bad_line] if bad_line else [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- grounding -------------------------------------------------------------------------------------------


def refer_fixture(tmp_path: Path, refs: list | None = None, protocol: int = 2) -> Path:
    """REFER layout: data/refcoco/{refs(unc).p,instances.json}, data/images/mscoco/images/train2014/*.jpg."""
    folder = tmp_path / "data" / "refcoco"
    folder.mkdir(parents=True)
    train = tmp_path / "data" / "images" / "mscoco" / "images" / "train2014"
    png(train / "COCO_train2014_000000000001.jpg", (640, 480))
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [64, 120, 256, 360], "category_id": 1}],
        "categories": [{"id": 1, "name": "dog"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances, indent=1), encoding="utf-8")
    if refs is None:
        refs = [
            {
                "ref_id": 0,
                "ann_id": 10,
                "image_id": 1,
                "split": "testA",
                "file_name": "COCO_train2014_000000000001_10.jpg",
                "sentences": [{"sent_id": 5, "sent": "left dog", "raw": "Left dog"}, {"sent_id": 6, "sent": "dog"}],
            },
            {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "val", "sentences": [{"sent_id": 7, "sent": "x"}]},
        ]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=protocol))
    return folder


def test_grounding_reads_refer_layout(tmp_path: Path) -> None:
    folder = refer_fixture(tmp_path)
    result = GROUNDING_TASKS["refcoco-testA"]().read(folder)
    assert [i.id for i in result.items] == ["5", "6"] and not result.errors
    item = result.items[0]
    assert item.question == "left dog" and item.target == (64.0, 120.0, 320.0, 480.0)
    assert item.meta["width"] == 640 and Path(item.images[0]).is_absolute()
    assert [i.id for i in GROUNDING_TASKS["refcoco-val"]().read(folder).items] == ["7"]
    assert set(GROUNDING_TASKS) >= {"refcocoplus-testB", "refcocog-val", "refcocog-test"}


def test_grounding_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([os.system]))
    with pytest.raises(DataError, match=r"refusing to load (posix|nt)\.system"):
        load_refs(path)
    path.write_bytes(pickle.dumps([{"a": {1, 2}}], protocol=2))  # builtins such as set are fine
    assert load_refs(path) == [{"a": {1, 2}}]


def test_grounding_refer_errors(tmp_path: Path) -> None:
    folder = refer_fixture(tmp_path, refs=[{"ref_id": 3, "ann_id": 99, "image_id": 1, "split": "val", "sentences": []}])
    task = GROUNDING_TASKS["refcoco-val"]()
    with pytest.raises(DataError) as info:
        task.read(folder)
    assert info.value.field == "ann_id" and info.value.record_id == 3 and "refs(unc).p" in info.value.file
    assert len(task.read(folder, skip_bad=True).errors) == 1
    with pytest.raises(DataError, match="file not found"):
        task.read(tmp_path / "missing")
    folder = refer_fixture(tmp_path / "other")
    (folder.parent / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000001.jpg").unlink()
    with pytest.raises(DataError, match="image not found") as info:
        GROUNDING_TASKS["refcoco-testA"]().read(folder)
    assert (info.value.record_id, info.value.field) == (0, "image_id")


def test_grounding_jsonl_prompts_and_errors(tmp_path: Path) -> None:
    png(tmp_path / "coco" / "a.jpg")
    good = {"image": "coco/a.jpg", "sent": "the cat", "bbox": [10, 20, 110, 220], "width": 200, "height": 400}
    path = write_jsonl(tmp_path / "refcoco_val.jsonl", [good, {**good, "bbox": [1, 2]}, {**good, "image": "nope.jpg"}])
    task = GROUNDING_TASKS["refcoco-val"]()
    with pytest.raises(DataError) as info:
        task.read(path)
    assert (info.value.line, info.value.field) == (2, "bbox")
    result = task.read(path, skip_bad=True)
    assert len(result.items) == 1 and [(e.line, e.field) for e in result.errors] == [(2, "bbox"), (3, "image")]
    item = result.items[0]
    assert task.prompt(item, "base") == f"<img>{item.images[0]}</img><ref>the cat</ref><box>"
    assert task.prompt(item, "chat").startswith(
        f"Picture 1: <img>{item.images[0]}</img>\n"
    ) and "the cat" in task.prompt(item, "chat")
    assert task.max_new_tokens == 28
    broken = write_jsonl(tmp_path / "b.jsonl", [good], bad_line='{"image": ')
    with pytest.raises(DataError) as info:
        task.read(broken)
    assert info.value.line == 2 and info.value.column is not None


def test_grounding_score_modes(tmp_path: Path) -> None:
    png(tmp_path / "a.jpg")
    rec = {"image": "a.jpg", "sent": "x", "bbox": [0, 0, 500, 500], "width": 1000, "height": 1000}
    task = GROUNDING_TASKS["refcoco-val"]()
    items = task.read(write_jsonl(tmp_path / "g.jsonl", [rec] * 3)).items
    # hit in both; spaced points fail only in qwen mode; no box misses in both
    replies = ["<ref>x</ref><box>(0,0),(500,500)</box>", "(0,0), (500,500)", "a dog"]
    preds = [task.postprocess(r, i) for r, i in zip(replies, items)]
    canonical = task.score(items, preds)
    qwen = task.score(items, preds, mode="qwen")
    assert list(canonical)[0] == "acc@0.5"
    assert canonical["acc@0.5"] == pytest.approx(200 / 3) and qwen["acc@0.5"] == pytest.approx(100 / 3)


# ---- multiple choice -------------------------------------------------------------------------------------


def scienceqa_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "scienceqa"
    problems = {
        "11": {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1, "hint": "", "image": "image.png",
               "subject": "natural science", "split": "test"},
        "12": {"question": "Text only?", "choices": ["a", "b"], "answer": 0, "hint": "h", "image": None, "split": "test"},
        "13": {"question": "Pick", "choices": ["x", "y", "z"], "answer": 2, "hint": "A hint.", "image": "image.png",
               "subject": "language science", "split": "test"},
        "20": {"question": "train", "choices": ["a"], "answer": 0, "hint": "", "image": "image.png", "split": "train"},
    }  # fmt: skip
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(problems, indent=2), encoding="utf-8")
    (root / "pid_splits.json").write_text(json.dumps({"train": ["20"], "test": ["11", "12", "13"]}), encoding="utf-8")
    png(root / "images" / "test" / "11" / "image.png")
    png(root / "images" / "test" / "13" / "image.png")
    return root


def test_scienceqa_reader_prompts_and_likelihood(tmp_path: Path) -> None:
    root = scienceqa_fixture(tmp_path)
    task = MC_TASKS["scienceqa-img"]()
    items = task.read(root).items
    assert [i.id for i in items] == ["11", "13"] and [i.target for i in items] == ["B", "C"]
    base = task.prompt(items[0], "base")
    assert base == (
        f"<img>{items[0].images[0]}</img>Context: N/A\nQuestion: Which is a mammal?\nOptions: A. frog\nB. dog\nAnswer:"
    )
    chat = task.prompt(items[1], "chat")
    assert chat.startswith(f"Picture 1: <img>{items[1].images[0]}</img>\nContext: A hint.\n") and "C. z" in chat
    assert chat.endswith("directly.")
    likelihood = MC_TASKS["scienceqa-img-likelihood"]()
    assert likelihood.likelihood and not task.likelihood
    assert likelihood.option_texts(items[1], "base") == [" A", " B", " C"]
    assert likelihood.option_texts(items[1], "chat") == ["A", "B", "C"]
    scores = likelihood.score(items, [1, 0])  # option indices from the likelihood runner
    assert scores["accuracy"] == 50.0 and scores["accuracy/natural science"] == 100.0
    assert scores["accuracy/language science"] == 0.0


def test_multiple_choice_generation_postprocess_and_score(tmp_path: Path) -> None:
    task = MC_TASKS["scienceqa-img"]()
    items = task.read(scienceqa_fixture(tmp_path)).items
    preds = [task.postprocess(r, i) for r, i in zip(["The answer is B.", "I think it is x"], items)]
    assert preds == ["B", "A"]
    for mode in ("canonical", "qwen"):
        assert task.score(items, preds, mode=mode)["accuracy"] == 50.0
    assert task.postprocess("no idea", items[0]) == ""
    assert task.score(items, ["", "(C)"])["accuracy"] == 50.0


def test_scienceqa_errors(tmp_path: Path) -> None:
    root = scienceqa_fixture(tmp_path)
    problems = json.loads((root / "problems.json").read_text())
    problems["13"]["answer"] = 7
    (root / "problems.json").write_text(json.dumps(problems, indent=2), encoding="utf-8")
    task = MC_TASKS["scienceqa-img"]()
    with pytest.raises(DataError) as info:
        task.read(root)
    assert (info.value.field, info.value.record_id) == ("answer", "13") and info.value.line > 1
    assert [i.id for i in task.read(root, skip_bad=True).items] == ["11"]
    (root / "images" / "test" / "11" / "image.png").unlink()
    with pytest.raises(DataError, match="image not found") as info:
        task.read(root, skip_bad=False)
    assert info.value.record_id == "11"
    (root / "pid_splits.json").write_text('{"test": [1,}', encoding="utf-8")
    with pytest.raises(DataError) as info:
        task.read(root)
    assert info.value.file.endswith("pid_splits.json") and (info.value.line, info.value.column) == (1, 13)


def test_scienceqa_qwen_jsonl(tmp_path: Path) -> None:
    png(tmp_path / "images" / "test" / "5" / "image.png")
    rec = {"image": "images/test/5/image.png", "hint": "", "question": "Q?", "choices": ["a", "b"], "answer": 0}
    task = MC_TASKS["scienceqa-img-likelihood"]()
    path = write_jsonl(tmp_path / "scienceqa_test_img.jsonl", [rec, {**rec, "answer": 3}])
    with pytest.raises(DataError) as info:
        task.read(path)
    assert (info.value.line, info.value.field) == (2, "answer")
    item = task.read(path, skip_bad=True).items[0]
    assert task.prompt(item, "base").endswith("Context: N/A\nQuestion: Q?\nOptions: A. a\nB. b\nAnswer:")


def seed_fixture(tmp_path: Path) -> Path:
    images = tmp_path / "SEED-Bench-image"
    png(images / "100_1.jpg")
    q = {
        "question_id": "101",
        "question": "What?",
        "choice_a": "cat",
        "choice_b": "dog",
        "choice_c": "cow",
        "choice_d": "hen",
        "answer": "C",
        "data_id": "100_1.jpg",
        "data_type": "image",
        "question_type_id": 1,
    }
    video = {**q, "question_id": "v1", "data_id": "clip.mp4", "data_type": "video", "question_type_id": 10}
    data = {"questions": [q, video, {**q, "question_id": "102", "question_type_id": 9}],
            "question_type": {"Scene Understanding": 1}}  # fmt: skip
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def test_seed_bench_reader_prompts_and_errors(tmp_path: Path) -> None:
    path = seed_fixture(tmp_path)
    task = MC_TASKS["seed-bench-img"]()
    items = task.read(path).items
    assert [i.id for i in items] == ["101", "102"] and items[0].target == "C"
    assert task.prompt(items[0], "base") == (
        f"<img>{items[0].images[0]}</img>\nQuestion: What?\nOptions: A. cat\nB. dog\nC. cow\nD. hen\nAnswer:"
    )
    assert task.prompt(items[0], "chat").startswith(f"Picture 1: <img>{items[0].images[0]}</img>\nQuestion: What?")
    scores = task.score(items, [task.postprocess("cow", items[0]), task.postprocess("D", items[1])])
    assert scores["accuracy"] == 50.0 and scores["accuracy/1"] == 100.0 and scores["accuracy/9"] == 0.0
    data = json.loads(path.read_text())
    data["questions"][2]["answer"] = "E"
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    with pytest.raises(DataError) as info:
        task.read(path)
    assert (info.value.field, info.value.record_id) == ("answer", "102") and info.value.line > 2
    data["questions"][2].pop("question")
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    result = task.read(path, skip_bad=True)
    assert len(result.items) == 1 and result.errors[0].field == "question"


def test_seed_bench_qwen_jsonl(tmp_path: Path) -> None:
    png(tmp_path / "img" / "1.jpg")
    prompt = "<img>img/1.jpg</img>\nQuestion: Q\nOptions: A. a\nB. b\nC. c\nD. d\nAnswer:"
    path = write_jsonl(tmp_path / "image_input.jsonl", [{"question_id": 7, "prompt": prompt, "answer": "B"}])
    task = MC_TASKS["seed-bench-img-likelihood"]()
    item = task.read(path).items[0]
    assert task.prompt(item, "base") == prompt.replace("img/1.jpg", item.images[0])
    assert task.option_texts(item, "base") == [" A", " B", " C", " D"]
    assert task.score([item], [1])["accuracy"] == 100.0


# ---- MME -------------------------------------------------------------------------------------------------


def mme_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "MME_Benchmark_release_version"
    existence = root / "existence"  # image and questions side by side
    for name in ("000000006040", "000000044279"):
        png(existence / f"{name}.jpg")
        (existence / f"{name}.txt").write_text(
            "Is there a train in this image? Please answer yes or no.\tYes\nIs there a bed? Please answer yes or no.\tNo\n"
        )
    scene = root / "scene"  # images/ + questions_answers_YN/
    png(scene / "images" / "Places365_val_00000001.jpg")
    (scene / "questions_answers_YN").mkdir(parents=True)
    (scene / "questions_answers_YN" / "Places365_val_00000001.txt").write_text(
        "Is it a beach?\tYes\nIs it a mall?\tNo\n"
    )
    code = root / "code_reasoning"
    png(code / "0020.png")
    (code / "0020.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    (root / "eval_tool").mkdir()
    return root


def test_mme_reader_both_layouts_and_prompts(tmp_path: Path) -> None:
    task = MME_TASKS["mme"]()
    items = task.read(mme_fixture(tmp_path)).items
    assert [i.meta["subtask"] for i in items] == ["existence"] * 4 + ["scene"] * 2 + ["code_reasoning"] * 2
    assert items[0].target == "Yes" and items[1].target == "No" and items[4].images[0].endswith("00000001.jpg")
    assert task.prompt(items[4], "chat") == f"Picture 1: <img>{items[4].images[0]}</img>\nIs it a beach?"
    assert task.prompt(items[4], "base") == f"<img>{items[4].images[0]}</img>Is it a beach? Answer:"


def test_mme_score_modes(tmp_path: Path) -> None:
    task = MME_TASKS["mme"]()
    items = task.read(mme_fixture(tmp_path)).items
    replies = ["Yes", "No", "Yes, there is.", "Not sure", "yes", "no", "Yes", "I think yes"]
    canonical = task.score(items, replies)
    # existence: canonical reads "Not sure" as other -> acc 3/4, acc+ 1/2; qwen reads it as no -> 4/4, 2/2
    assert list(canonical)[:2] == ["perception", "cognition"]
    assert canonical["existence/acc"] == 75.0 and canonical["existence/acc+"] == 50.0
    assert canonical["perception"] == pytest.approx(125.0 + 200.0)  # existence + scene
    assert canonical["code_reasoning/acc"] == 50.0 and canonical["cognition"] == 50.0
    qwen = task.score(items, replies, mode="qwen")
    assert qwen["existence/score"] == 200.0 and qwen["perception"] == 400.0
    assert qwen["code_reasoning/acc"] == 50.0  # "I think yes": no yes/no in its first 4 characters


def test_mme_errors(tmp_path: Path) -> None:
    root = mme_fixture(tmp_path)
    bad = root / "existence" / "000000044279.txt"
    bad.write_text("Is there a train?\tYes\nIs there a bed?\tMaybe\n")
    task = MME_TASKS["mme"]()
    with pytest.raises(DataError) as info:
        task.read(root)
    assert (info.value.file, info.value.line, info.value.field) == (str(bad), 2, "answer")
    bad.write_text("no tab here\n")
    result = task.read(root, skip_bad=True)
    assert len(result.items) == 6 and result.errors[0].field == "question"
    bad.write_text("Is there a train?\tYes\n")
    (root / "code_reasoning" / "0020.png").unlink()
    with pytest.raises(DataError, match="no image 0020") as info:
        task.read(root)
    assert (info.value.line, info.value.field) == (1, "image")
    with pytest.raises(DataError, match="no MME subtask"):
        task.read(tmp_path)


# ---- judge -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("8 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
        ("8, 6.5\n", (8.0, 6.5)),
        ("  \n9/10 and 7/10\nreason", (9.0, 7.0)),
        ("Assistant 1: 8/10\nAssistant 2: 4/10", (8.0, 4.0)),
        ("Assistant 2's score is 3. Assistant 1 score: 9.", (9.0, 3.0)),
        ("My verdict: [[7, 9]]", (7.0, 9.0)),
        ("Both answers are fine.", None),
        ("11 3\n", None),
        ("", None),
    ],
)
def test_parse_scores(reply: str, expected: tuple[float, float] | None) -> None:
    assert parse_scores(reply) == expected


class FakeEndpoint:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers from a script of (status, body)."""

    def __init__(self, script: list[tuple[int, object]]) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, dict, dict]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append((self.path, dict(self.headers), body))
                status, reply = endpoint.script.pop(0) if endpoint.script else (500, "exhausted")
                data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0.25")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


ITEM = JudgeItem("q1", "A red square on white.", "What colour is the square?", "It is red.", "Red.")


def test_judge_retries_then_scores() -> None:
    script = [(503, "busy"), (429, "slow down"), (200, completion("9 8\nBoth correct."))]
    waits: list[float] = []
    with FakeEndpoint(script) as url:
        config = JudgeConfig(base_url=url, model="judge-1", api_key="sk-test", retries=3, backoff=0.5, timeout=5)
        scores = judge([ITEM], config, sleep=waits.append)
    assert waits == [0.5, 0.25]  # backoff, then the server's Retry-After
    assert scores[0].reference_score == 9.0 and scores[0].answer_score == 8.0
    assert summarize(scores) == {"answer": 8.0, "reference": 9.0, "relative": pytest.approx(800 / 9), "count": 1,
                                 "unreadable": 0}  # fmt: skip


def test_judge_request_shape_and_errors() -> None:
    endpoint = FakeEndpoint([(200, completion("no scores here")), (401, "bad key"), (200, "not json")])
    with endpoint as url:
        config = JudgeConfig(base_url=url + "/", model="judge-1", api_key="sk-test", retries=1, backoff=0)
        scores = judge([ITEM], config, sleep=lambda s: None)
        assert scores[0].answer_score is None and summarize(scores)["unreadable"] == 1
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge([ITEM], config, sleep=lambda s: None)
        with pytest.raises(JudgeError, match="did not answer a chat completion"):
            chat_completion(config, [{"role": "user", "content": "hi"}], sleep=lambda s: None)
    path, headers, body = endpoint.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["temperature"] == 0.0
    user = body["messages"][-1]["content"]
    assert "A red square on white." in user and "[Assistant 1]\nIt is red." in user and "[Assistant 2]\nRed." in user
    assert len(endpoint.requests) == 3  # 401 is not retried


def test_judge_gives_up_and_config_from_env() -> None:
    with FakeEndpoint([(500, "down")] * 3) as url:
        config = JudgeConfig(base_url=url, model="m", retries=2, backoff=1.0)
        waits: list[float] = []
        with pytest.raises(JudgeError, match="HTTP 500.*gave up after 3 attempts"):
            chat_completion(config, [], sleep=waits.append)
    assert waits == [1.0, 2.0]
    env = {"QWEN_VL_JUDGE_MODEL": "gpt-x", "OPENAI_BASE_URL": "http://h/v1", "OPENAI_API_KEY": "k"}
    config = JudgeConfig.from_env(env=env, timeout=5)
    assert (config.model, config.base_url, config.api_key, config.timeout) == ("gpt-x", "http://h/v1", "k", 5)
    assert JudgeConfig.from_env(model="m", env={}).base_url == judge_mod.DEFAULT_BASE_URL
    with pytest.raises(ValueError, match="QWEN_VL_JUDGE_MODEL"):
        JudgeConfig.from_env(env={})
