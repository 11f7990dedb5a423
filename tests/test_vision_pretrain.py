"""``qwen-vl pretrain-vision``: trains only the vision tower, writes a loadable checkpoint,
resumes an interrupted run to the same weights, and refuses other settings in the same folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_vl.bundled import DEMO_MODEL_DIR
from qwen_vl.cli import main
from qwen_vl.data.synthetic import generate
from qwen_vl.finetune import vision_pretrain
from qwen_vl.finetune.scratch import init_checkpoint
from qwen_vl.finetune.vision_pretrain import VisionPretrainSettings, pretrain_vision


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    generate(root / "data", 6, seed=5)
    init_checkpoint(DEMO_MODEL_DIR, root / "init", seed=0)
    return root / "init", root / "data"


def _settings(start, out: Path, **kw) -> VisionPretrainSettings:
    init, data = start
    base = dict(steps=4, batch_size=2, save_steps=2, warmup_steps=1, eval_data=str(data), eval_pictures=4)
    return VisionPretrainSettings(str(init), [str(data)], str(out), **{**base, **kw})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_trains_the_tower_only_and_writes_a_checkpoint(start, tmp_path):
    final = pretrain_vision(_settings(start, tmp_path / "run"), quiet=True)
    before, after = _weights(start[0]), _weights(final)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("transformer.visual.") for k in changed)
    assert "transformer.visual.attn_pool.pos_embed" not in changed
    assert (final / "qwen.tiktoken").is_file() and (final / "config.json").is_file()
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and all(
        f'"heldout_{k}"' in log[-1] for k in ("colour_acc", "char_acc", "empty_acc", "no_letter_acc", "count_acc")
    )


def test_interrupted_run_resumes_to_the_same_weights(start, tmp_path, monkeypatch):
    whole = _weights(pretrain_vision(_settings(start, tmp_path / "whole"), quiet=True))
    real = vision_pretrain.PictureBatches.batch

    def stop_at_three(self, step, size):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, size)

    monkeypatch.setattr(vision_pretrain.PictureBatches, "batch", stop_at_three)
    with pytest.raises(KeyboardInterrupt):
        pretrain_vision(_settings(start, tmp_path / "cut"), quiet=True)
    assert not (tmp_path / "cut" / "final").exists()
    monkeypatch.setattr(vision_pretrain.PictureBatches, "batch", real)
    resumed = _weights(pretrain_vision(_settings(start, tmp_path / "cut"), quiet=True))
    for k in whole:
        assert torch.allclose(whole[k], resumed[k], atol=1e-6), k


def test_other_settings_in_the_same_folder_are_refused(start, tmp_path):
    pretrain_vision(_settings(start, tmp_path / "run", steps=2), quiet=True)
    with pytest.raises(ValueError, match="other settings"):
        pretrain_vision(_settings(start, tmp_path / "run", steps=2, learning_rate=1e-3), quiet=True)


def test_cli_and_missing_data(start, tmp_path, capsys):
    init, data = start
    code = main(
        [
            "pretrain-vision",
            "--model",
            str(init),
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / "o"),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
    assert code == 0 and "checkpoint in" in capsys.readouterr().out
    code = main(
        [
            "pretrain-vision",
            "--model",
            str(init),
            "--data",
            str(tmp_path),
            "--output-dir",
            str(tmp_path / "p"),
            "--steps",
            "1",
            "--quiet",
        ]
    )
    assert code == 2 and "no truth.jsonl" in capsys.readouterr().err


def test_rare_labels_weigh_as_much_as_the_empty_places():
    logits = torch.randn(2, 8, 3)
    labels = torch.zeros(2, 8, dtype=torch.long)
    labels[0, 0], labels[1, 5] = 2, 1
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    on = labels.flatten() > 0
    expected = ce[on].mean() + ce[~on].mean()
    assert torch.allclose(vision_pretrain.balanced_cross_entropy(logits, labels), expected)
    empty = torch.zeros(2, 8, dtype=torch.long)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), empty.flatten())
    assert torch.allclose(vision_pretrain.balanced_cross_entropy(logits, empty), plain)
