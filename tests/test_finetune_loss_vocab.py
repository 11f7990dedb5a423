"""--loss-vocab data: the loss's softmax over the data's tokens plus sampled others."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_finetune_train import SCENES, ask, make_data, settings

import qwen_vl
from qwen_vl.finetune.loss_vocab import LossVocabulary
from qwen_vl.finetune.trainer import train


def _case(vocab: int = 50, n: int = 6, dim: int = 8):
    torch.manual_seed(0)
    return torch.randn(n, dim), torch.randn(vocab, dim), torch.tensor([3, 7, 7, 12, 40, 3])


def test_every_other_row_sampled_is_exactly_the_full_loss():
    hidden, weight, targets = _case()
    lv = LossVocabulary.from_sequences([[3, 7, 12], [40, -100, 3]], vocab_size=50, negatives=1000)
    assert lv.ids.tolist() == [3, 7, 12, 40] and len(lv.others) == 46
    moved = lv.to("cpu")
    assert moved.ids.tolist() == lv.ids.tolist() and moved.others.tolist() == lv.others.tolist()
    logits, columns = lv.logits_and_targets(hidden, weight, targets)
    assert logits.shape == (6, 50) and columns.tolist() == [0, 1, 1, 2, 3, 0]
    full = F.cross_entropy(hidden @ weight.T, targets)
    assert F.cross_entropy(logits, columns).item() == pytest.approx(full.item(), rel=1e-6)


def test_sampled_rows_stand_for_the_rest_of_the_vocabulary():
    """A sample of the others, shifted by log(others / sampled), estimates the full normaliser."""
    hidden, weight, targets = _case(vocab=4000)
    weight[:] *= 0.05
    lv = LossVocabulary.from_sequences([targets.tolist()], vocab_size=4000, negatives=1000)
    logits, columns = lv.logits_and_targets(hidden, weight, targets)
    assert logits.shape == (6, len(lv) + 1000)
    assert logits[:, len(lv) :].mean().item() == pytest.approx(math.log(len(lv.others) / 1000), abs=0.1)
    full = F.cross_entropy(hidden @ weight.T, targets).item()
    assert F.cross_entropy(logits, columns).item() == pytest.approx(full, rel=0.02)
    no_others = LossVocabulary.from_sequences([targets.tolist()], vocab_size=4000, negatives=0)
    logits, _ = no_others.logits_and_targets(hidden, weight, targets)
    assert logits.shape == (6, len(no_others))


def test_labels_outside_the_vocabulary_and_bad_ids_are_named():
    hidden, weight, targets = _case()
    lv = LossVocabulary.from_sequences([[3, 7]], vocab_size=50)
    with pytest.raises(ValueError, match=r"labels \[12, 40\] are not in the loss vocabulary"):
        lv.logits_and_targets(hidden, weight, targets)
    with pytest.raises(ValueError, match="token id 60 is outside the vocabulary of 50"):
        LossVocabulary.from_sequences([[3, 60]], vocab_size=50)


def test_model_loss_with_the_whole_vocabulary_kept_equals_the_plain_loss(fp32_model):
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    plain = fp32_model(ids, labels=labels, compute_logits=False).loss
    everything = LossVocabulary.from_sequences([ids.flatten().tolist()], fp32_model.config.vocab_size, 10**6)
    kept = fp32_model(ids, labels=labels, compute_logits=False, loss_vocab=everything).loss
    assert kept.item() == pytest.approx(plain.item(), rel=1e-5)


@pytest.mark.slow
def test_finetune_with_the_data_vocabulary_learns_the_answers(checkpoint_dir, tokenizer, tmp_path):
    """Trained on the data's tokens, the saved model answers right with the whole vocabulary."""
    data = make_data(tmp_path / "data")
    s = settings(
        checkpoint_dir, data, tmp_path / "out", batch_size=2, max_steps=30, learning_rate=2e-3,
        lr_scheduler="constant", loss_vocab="data",
    )  # fmt: skip
    result = train(s, quiet=True)
    assert result.losses[0] > 5 and result.losses[-1] < 0.05
    model = qwen_vl.QWenLMHeadModel.from_pretrained(tmp_path / "out" / "final", dtype=torch.float32)
    for name, (_, _, answer) in SCENES.items():
        assert ask(model, tokenizer, data.parent, name) == answer


def test_data_vocabulary_is_refused_where_it_does_not_apply(checkpoint_dir, tmp_path):
    with pytest.raises(ValueError, match="--loss-vocab must be one of full, data"):
        settings(checkpoint_dir, tmp_path / "d.json", tmp_path, loss_vocab="some")
    with pytest.raises(ValueError, match="--loss-vocab data is for full fine-tuning"):
        settings(checkpoint_dir, tmp_path / "d.json", tmp_path, loss_vocab="data", lora=True)
