"""The evaluation runner with small in-test tasks on the golden checkpoint: answers equal
the model's own greedy generation, a killed run resumes, likelihood scoring, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen_vl.eval import predictions as predictions_module
from qwen_vl.eval import registry
from qwen_vl.eval.likelihood import option_losses
from qwen_vl.eval.runner import EvalSettings, evaluate
from qwen_vl.eval.tasks.base import EvalItem, ReadResult, Task

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


def direct_answer(model, tokenizer, task: FakeVQA, item: EvalItem, style: str) -> str:
    ids = tokenizer.encode(task.prompt(item, style))
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
    losses = option_losses(fp32_model, context, options)
    for option, loss in zip(options, losses):  # against full logits of each row alone
        ids = torch.tensor([context + option])
        logits = fp32_model(ids).logits[0, len(context) - 1 : -1]
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
