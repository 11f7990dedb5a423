"""A training loss whose softmax runs over the data's own tokens instead of the whole vocabulary.

Qwen-VL's vocabulary has 151,936 rows. On a small model trained on a narrow domain (the
synthetic shapes world uses about a thousand distinct tokens), ``lm_head`` over every row
at every labelled position is most of a training step. ``LossVocabulary`` keeps the rows
that occur in the data's input ids (labels are a part of them) and, at every call, a fresh
uniform sample of the other rows whose logits are shifted by ``log(others / sampled)``:
the sampled softmax estimate of the full normaliser, so the model still learns to keep
the unseen rows' logits low. With every other row sampled the loss is exactly the full
cross-entropy. The saved model keeps the full vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

#: Rows drawn from outside the data's tokens at every step (``--loss-vocab data``).
DEFAULT_NEGATIVES = 4096


@dataclass(frozen=True)
class LossVocabulary:
    """``ids`` (V_d,) sorted ids of the data; ``others`` (V - V_d,) the rest of the
    vocabulary; ``negatives`` of them drawn per call (all of them when larger)."""

    ids: torch.Tensor
    others: torch.Tensor
    negatives: int = DEFAULT_NEGATIVES

    @classmethod
    def from_sequences(
        cls, sequences: Iterable[Sequence[int]], vocab_size: int, negatives: int = DEFAULT_NEGATIVES
    ) -> LossVocabulary:
        """The vocabulary of every id in ``sequences`` (negative ids, i.e. ignored labels, skipped)."""
        if negatives < 0:
            raise ValueError(f"negatives must not be negative, got {negatives}")
        seen = torch.zeros(vocab_size, dtype=torch.bool)
        for seq in sequences:
            ids = torch.as_tensor(list(seq), dtype=torch.long)
            ids = ids[ids >= 0]
            if len(ids) and int(ids.max()) >= vocab_size:
                raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {vocab_size}")
            seen[ids] = True
        return cls(seen.nonzero().flatten(), (~seen).nonzero().flatten(), negatives)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> LossVocabulary:
        """The same vocabulary with its id tensors on ``device`` (where the training step runs)."""
        return replace(self, ids=self.ids.to(device), others=self.others.to(device))

    def logits_and_targets(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits (N, V_d + K) of ``hidden`` (N, D) against the rows of ``weight`` (V, D)
        kept for this call, and ``targets`` (N,) as column indices into them."""
        ids = self.ids.to(targets.device)
        column = torch.searchsorted(ids, targets).clamp(max=len(ids) - 1)
        if not bool((ids[column] == targets).all()):
            missing = targets[ids[column] != targets][:5].tolist()
            raise ValueError(f"labels {missing} are not in the loss vocabulary (built from other data?)")
        rows = ids
        shift = None
        if len(self.others) and self.negatives:
            if self.negatives >= len(self.others):
                drawn = self.others
            else:
                picks = torch.randint(len(self.others), (self.negatives,), device=self.others.device)
                drawn = self.others[picks]
            rows = torch.cat([ids, drawn.to(ids.device)])
            shift = math.log(len(self.others) / len(drawn))
        logits = (hidden @ weight[rows].T).float()  # (N, V_d + K)
        if shift:
            logits[:, len(ids) :] += shift
        return logits, column
