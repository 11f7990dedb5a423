"""The demo recipe's export step: bfloat16 weights into the package folder and the held-out
scores of ``qwen-vl eval --task synthetic`` checked against the quality bars."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def load_export():
    spec = importlib.util.spec_from_file_location("demo_export", REPO / "recipes" / "demo_model" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_scores(eval_dir: Path, metrics: dict) -> None:
    (eval_dir / "synthetic").mkdir(parents=True)
    run = {"task": "synthetic", "items": 1200, "metrics": metrics}  # the layout the eval runner writes
    (eval_dir / "synthetic" / "metrics.json").write_text(json.dumps(run), encoding="utf-8")


def test_export_reads_the_eval_scores_and_checks_every_bar(checkpoint_dir, tmp_path, capsys):
    export = load_export()
    package = tmp_path / "package"
    package.mkdir()
    good = {name: bar + 1 for name, bar in export.BARS.items()} | {"en_zh_gap": -2.0}
    write_scores(tmp_path / "eval", {**good, "colour_acc": 94.0})
    code = export.main(Path(checkpoint_dir), package, tmp_path / "eval")
    assert code == (0 if (package / "model.safetensors").stat().st_size <= 50_000_000 else 1)  # the size limit
    quality = json.loads((package / "quality.json").read_text(encoding="utf-8"))
    assert quality["bars"]["colour_acc"] == {"value": 94.0, "bar": 95.0, "met": False}
    assert quality["bars"]["en_zh_gap"]["met"] and not quality["all_met"]
    assert "colour_acc: 94.0 (bar 95.0) MISSED" in capsys.readouterr().out
    weights = load_file(str(package / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}

    shutil.rmtree(tmp_path / "eval")
    write_scores(tmp_path / "eval", good)
    export.main(Path(checkpoint_dir), package, tmp_path / "eval")
    assert json.loads((package / "quality.json").read_text(encoding="utf-8"))["all_met"]


def test_export_names_scores_without_metrics(checkpoint_dir, tmp_path):
    (tmp_path / "eval" / "synthetic").mkdir(parents=True)
    (tmp_path / "eval" / "synthetic" / "metrics.json").write_text("{}", encoding="utf-8")
    (tmp_path / "package").mkdir()
    with pytest.raises(SystemExit, match="no 'metrics' object"):
        load_export().main(Path(checkpoint_dir), tmp_path / "package", tmp_path / "eval")
