"""The evaluation runner with small in-test tasks on the golden checkpoint: answers equal
the model's own greedy generation, a killed run resumes, likelihood scoring, outputs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen_vl.eval import predictions as predictions_module
from qwen_vl.eval import registry
from qwen_vl.eval.likelihood import option_losses
from qwen_vl.eval.runner import EvalSettings, evaluate
from qwen_vl.eval.tasks.base import EvalItem, ReadResult, Task
from qwen_vl.images import ImagePolicy

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What colour is it?", "How many shapes?", "Where is the circle?", "Is it big?", "What is this?"]


class FakeVQA(Task):
    """Items from a JSON list {id, image, question}; exact match against ``target``."""

    name = "fake-vqa"
    family = "test"
    metric = "accuracy"
    max_new_tokens = 5

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        rows = json.loads(data.read_text())
        root = image_root or data.parent
        return ReadResult(
            [EvalItem(r["id"], [str((root / r["image"]).resolve())], r["question"], r.get("target")) for r in rows]
        )

    def prompt(self, item: EvalItem, style: str) -> str:
        if style == "chat":
            return f"Picture 1: <img>{item.images[0]}</img>\n{item.question}"
        return f"<img>{item.images[0]}</img>{item.question} Answer:"

    def score(self, items, predictions, mode="canonical"):
        hits = [float(p == i.target) for i, p in zip(items, predictions)]
        return {"accuracy": 100 * sum(hits) / len(hits)}


class FakeChoice(FakeVQA):
    name = "fake-choice"
    likelihood = True

    def option_texts(self, item, style):
        return [" red", " blue square", " green"]

    def score(self, items, predictions, mode="canonical"):
        return {"accuracy": 100 * sum(p == 0 for p in predictions) / len(predictions)}


@pytest.fixture(autouse=True)
def fake_tasks(monkeypatch):
    monkeypatch.setattr(registry, "all_tasks", lambda: {"fake-vqa": FakeVQA, "fake-choice": FakeChoice})


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "bench"
    folder.mkdir()
    rows = []
    for i, question in enumerate(QUESTIONS):
        Image.new("RGB", (40 + 10 * i, 40), (50 * i, 100, 200)).save(folder / f"p{i}.png")
        rows.append({"id": f"q{i}", "image": f"p{i}.png", "question": question})
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return path


def run(data: Path, out: Path, model, tokenizer, **kw):
    settings = EvalSettings(task=kw.pop("task", "fake-vqa"), data=data, model="unused", out=out, device="cpu", **kw)
    return evaluate(settings, model, tokenizer, quiet=True)


@contextlib.contextmanager
def images_of(model, item: EvalItem) -> Iterator[None]:
    """Let ``model`` open the item's images (the runner does this for its own calls only)."""
    previous, model.image_policy = model.image_policy, ImagePolicy(allowed_roots=(Path(item.images[0]).parent,))
    try:
        yield
    finally:
        model.image_policy = previous


def direct_answer(model, tokenizer, task: FakeVQA, item: EvalItem, style: str) -> str:
    ids = tokenizer.encode(task.prompt(item, style))
    with images_of(model, item):
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=task.max_new_tokens)
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_equal_the_models_greedy_generation(fp32_model, tokenizer, data, tmp_path):
    result = run(data, tmp_path / "out", fp32_model, tokenizer, style="base", batch_size=3)
    rows = read_rows(result.predictions)
    task = FakeVQA()
    items = task.read(data).items
    assert [r["id"] for r in rows] == [i.id for i in items]
    for row, item in zip(rows, items):
        assert row["response"] == direct_answer(fp32_model, tokenizer, task, item, "base")
        assert row["prediction"] == row["response"].strip()
    metrics = json.loads((tmp_path / "out" / "fake-vqa" / "metrics.json").read_text())
    assert metrics["items"] == 5 and metrics["style"] == "base" and metrics["mode"] == "canonical"
    assert metrics["metrics"] == {"accuracy": 0.0}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| fake-vqa | accuracy | 0.00 | canonical | base | 5 |" in summary


def test_a_killed_run_resumes_where_it_stopped(fp32_model, tokenizer, data, tmp_path, monkeypatch):
    clean = read_rows(run(data, tmp_path / "clean", fp32_model, tokenizer, style="base").predictions)
    written = []
    original = predictions_module.PredictionWriter.write

    def dies_after_two(self, row):
        if len(written) == 2:
            self._file.write('{"id": "q9", "resp')  # a line torn by the kill
            self._file.flush()
            raise KeyboardInterrupt
        written.append(row["id"])
        original(self, row)

    monkeypatch.setattr(predictions_module.PredictionWriter, "write", dies_after_two)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(data, out, fp32_model, tokenizer, style="base", batch_size=1)
    monkeypatch.setattr(predictions_module.PredictionWriter, "write", original)
    answered = []
    monkeypatch.setattr(
        predictions_module.PredictionWriter,
        "write",
        lambda self, row: (answered.append(row["id"]), original(self, row)),
    )
    result = run(data, out, fp32_model, tokenizer, style="base", batch_size=1)
    assert sorted(answered) == sorted({"q0", "q1", "q2", "q3", "q4"} - set(written))
    assert read_rows(result.predictions) == clean


def test_other_options_on_resume_are_refused_until_restart(fp32_model, tokenizer, data, tmp_path):
    out = tmp_path / "out"
    run(data, out, fp32_model, tokenizer, style="base", limit=2)
    with pytest.raises(ValueError, match="another style"):
        run(data, out, fp32_model, tokenizer, style="chat", limit=2)
    result = run(data, out, fp32_model, tokenizer, style="chat", limit=2, restart=True)
    assert result.items == 2 and result.extra["style"] == "chat"


def test_likelihood_task_picks_the_lowest_average_loss(fp32_model, tokenizer, data, tmp_path):
    result = run(data, tmp_path / "out", fp32_model, tokenizer, task="fake-choice", style="base", limit=2)
    task, item = FakeChoice(), FakeChoice().read(data).items[0]
    context = tokenizer.encode(task.prompt(item, "base"))
    options = [tokenizer.encode(t) for t in task.option_texts(item, "base")]
    with images_of(fp32_model, item):
        losses = option_losses(fp32_model, context, options)
        full = [fp32_model(torch.tensor([context + option])).logits[0, len(context) - 1 : -1] for option in options]
    for option, loss, logits in zip(options, losses, full):  # against full logits of each row alone
        assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(option)).item(), rel=1e-4)
    row = read_rows(result.predictions)[0]
    assert row["option_losses"] == pytest.approx(losses, rel=1e-5)
    assert row["prediction"] == min(range(3), key=lambda i: (losses[i], i))


def test_settings_name_the_bad_option():
    with pytest.raises(ValueError, match="--style must be one of auto, base, chat"):
        EvalSettings(task="t", data="d", model="m", out="o", style="fancy")
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        EvalSettings(task="t", data="d", model="m", out="o", batch_size=0)


def test_unknown_task_lists_the_known_ones(data, tmp_path, fp32_model, tokenizer):
    with pytest.raises(ValueError, match="unknown task 'nope'; tasks: fake-vqa, fake-choice"):
        run(data, tmp_path / "o", fp32_model, tokenizer, task="nope")


# ----- the command, one process and two ------------------------------------------------------


def vqav2_fixture(folder: Path, n: int = 5) -> Path:
    """VQAv2's questions + annotations pair and COCO-named images, ``n`` questions."""
    (folder / "val2014").mkdir(parents=True)
    questions, annotations = [], []
    for i in range(n):
        Image.new("RGB", (30 + 7 * i, 30), (40 * i, 90, 160)).save(folder / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        questions.append({"image_id": i, "question": QUESTIONS[i % len(QUESTIONS)], "question_id": 100 + i})
        answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]
        annotations.append({"question_id": 100 + i, "image_id": i, "answer_type": "yes/no", "answers": answers})
    (folder / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    path = folder / "v2_OpenEnded_mscoco_val2014_questions.json"
    path.write_text(json.dumps({"questions": questions}))
    return path


def eval_args(checkpoint_dir, data: Path, out: Path) -> list[str]:
    return [
        "eval", "--task", "vqav2-val", "--data", str(data), "--model", str(checkpoint_dir), "--out", str(out),
        "--style", "base", "--device", "cpu", "--batch-size", "2", "--quiet",
    ]  # fmt: skip


def cli(args: list[str], launcher: list[str] | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, *(launcher or []), "-m", "qwen_vl.cli", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_torchrun_processes_give_the_results_of_one(checkpoint_dir, tmp_path):
    data = vqav2_fixture(tmp_path / "vqav2")
    cli(eval_args(checkpoint_dir, data, tmp_path / "one"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(port)]  # fmt: skip
    cli(eval_args(checkpoint_dir, data, tmp_path / "two"), launcher)
    one = read_rows(tmp_path / "one" / "vqav2-val" / "predictions.jsonl")
    two = read_rows(tmp_path / "two" / "vqav2-val" / "predictions.jsonl")
    assert len(one) == 5
    assert [(r["id"], r["response"]) for r in one] == [(r["id"], r["response"]) for r in two]
    metrics_one = json.loads((tmp_path / "one" / "vqav2-val" / "metrics.json").read_text())
    metrics_two = json.loads((tmp_path / "two" / "vqav2-val" / "metrics.json").read_text())
    assert metrics_one["metrics"] == metrics_two["metrics"] and metrics_one["items"] == 5
    assert sorted(p.name for p in (tmp_path / "two" / "vqav2-val").glob("predictions.rank*.jsonl")) == [
        "predictions.rank0.jsonl",
        "predictions.rank1.jsonl",
    ]
    assert "| vqav2-val | vqa_accuracy |" in (tmp_path / "two" / "summary.md").read_text()


def test_the_callers_image_policy_is_restored(fp32_model, tokenizer, data, tmp_path):
    before = fp32_model.image_policy
    run(data, tmp_path / "out", fp32_model, tokenizer, style="base", limit=1)
    assert fp32_model.image_policy is before
