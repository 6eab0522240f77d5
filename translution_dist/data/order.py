"""The global sample order of an epoch: one sequence, the same on every rank, that any layout cuts into batches.

A sample is named by its **id**, its position in the split (shards in ``index.json`` order).
Training: the shards are concatenated in an order shuffled per (seed, epoch, cycle), and the
samples inside consecutive windows of ``shuffle_buffer`` positions of that sequence are shuffled,
seeded by (seed, epoch, cycle, window) alone. An epoch longer than the split
(``data.samples_per_epoch``) continues into the next cycle: a new such permutation. Evaluation:
the split in index order. Nothing here depends on ranks, batch sizes or workers, so what a run
has consumed is always a prefix of its epoch's order, whatever layouts it ran under.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from functools import lru_cache


class EpochOrder:
    """Sample ``k`` of one epoch: ``order[k]`` is a sample id, for any ``k >= 0`` (cycles repeat the split)."""

    def __init__(self, counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool, shuffle_buffer: int = 0) -> None:
        """``counts``: samples per shard in ``index.json`` order; ``shuffle_buffer``: the shuffled window (0 or 1: shard order only)."""
        self.counts = tuple(counts)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.window = shuffle_buffer if shuffle and shuffle_buffer > 1 else 1
        self.total = sum(self.counts)
        self.starts = (0, *itertools.accumulate(self.counts))[:-1]
        self._cycles: dict[int, tuple[list[int], list[int]]] = {}

    def __getitem__(self, k: int) -> int:
        cycle, q = divmod(k, self.total)
        if self.window > 1:
            window, offset = divmod(q, self.window)
            start = window * self.window
            size = min(self.window, self.total - start)
            q = start + _window_permutation(self.seed, self.epoch, cycle, window, size)[offset]
        shards, ends = self._concatenation(cycle)
        j = bisect.bisect_right(ends, q)
        return self.starts[shards[j]] + q - (ends[j] - self.counts[shards[j]])

    def ids(self, start: int, stop: int) -> list[int]:
        return [self[k] for k in range(start, stop)]

    def locate(self, sample_id: int) -> tuple[int, int]:
        """``(shard, index in shard)`` of a sample id."""
        shard = bisect.bisect_right(self.starts, sample_id) - 1
        return shard, sample_id - self.starts[shard]

    def _concatenation(self, cycle: int) -> tuple[list[int], list[int]]:
        """The shards of a cycle in order, and where each ends in their concatenation."""
        if cycle not in self._cycles:
            shards = shard_order(len(self.counts), seed=self.seed, epoch=self.epoch, cycle=cycle, shuffle=self.shuffle)
            self._cycles = {cycle: (shards, list(itertools.accumulate(self.counts[s] for s in shards)))}
        return self._cycles[cycle]


def shard_order(num_shards: int, *, seed: int, epoch: int, cycle: int, shuffle: bool) -> list[int]:
    """The shard order of one cycle."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}:{cycle}").shuffle(order)
    return order


@lru_cache(maxsize=4)
def _window_permutation(seed: int, epoch: int, cycle: int, window: int, size: int) -> list[int]:
    order = list(range(size))
    random.Random(f"window:{seed}:{epoch}:{cycle}:{window}").shuffle(order)
    return order
