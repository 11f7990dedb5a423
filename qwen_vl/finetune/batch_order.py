"""Data order that can be resumed: batches are a function of ``(seed, epoch)`` alone.

A run that stopped after ``n`` batches of epoch ``e`` continues with
``sampler.set_epoch(e); sampler.skip(n)`` and sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def resumable_batch_order(
    num_items: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    lengths: list[int] | None = None,
    drop_last: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    group_size: int = 50,
) -> list[list[int]]:
    """The batches of item indices for ``epoch``: a function of ``(seed, epoch)`` alone.

    Items are shuffled into global batches of ``batch_size * num_replicas``; rank ``r``
    takes slice ``r`` of each, so one process with ``batch_size * num_replicas`` sees the
    same global batches as ``num_replicas`` processes. With ``lengths``, each run of
    ``group_size`` global batches is sorted by length (longest first) before being cut,
    so batches hold items of similar length, and the batches are then shuffled. With more
    than one replica, or with ``drop_last``, a last incomplete global batch is dropped.
    """
    if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or group_size < 1:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < num_replicas, got {batch_size}, {rank}, {num_replicas}")
    if lengths is not None and len(lengths) != num_items:
        raise ValueError(f"lengths has {len(lengths)} entries for {num_items} items")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_items).tolist()
    global_size = batch_size * num_replicas
    if lengths is not None:
        chunk = global_size * group_size
        order = [i for s in range(0, num_items, chunk) for i in sorted(order[s : s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s : s + global_size] for s in range(0, num_items, global_size)]
    if batches and len(batches[-1]) < global_size and (drop_last or num_replicas > 1):
        batches.pop()
    if lengths is not None:
        batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return [b[rank * batch_size : (rank + 1) * batch_size] for b in batches]


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler over :func:`resumable_batch_order` (pass it as ``DataLoader(batch_sampler=...)``).

    Call ``set_epoch(e)`` before each epoch and, when resuming, ``skip(n)`` to drop the
    first ``n`` batches of the next pass. Give the DataLoader its own ``generator`` too:
    without one it draws a seed from torch's global generator on every pass, which
    shifts the random stream (dropout) of a resumed run.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        lengths: list[int] | None = None,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.lengths, self.drop_last, self.num_replicas, self.rank = lengths, drop_last, num_replicas, rank
        self.epoch = 0
        self._skip = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, batches: int) -> None:
        """Leave out the first ``batches`` batches of the next pass (once)."""
        if batches < 0:
            raise ValueError(f"cannot skip {batches} batches")
        self._skip = batches

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch, skipped ones included."""
        if self._cache is None or self._cache[0] != self.epoch:
            order = resumable_batch_order(
                self.num_items,
                self.batch_size,
                seed=self.seed,
                epoch=self.epoch,
                lengths=self.lengths,
                drop_last=self.drop_last,
                num_replicas=self.num_replicas,
                rank=self.rank,
            )
            self._cache = (self.epoch, order)
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        start, self._skip = self._skip, 0
        yield from self.batches()[start:]

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self._skip)
