"""The per-rank iterable dataset: one rank's slice of each global batch, from any number of workers.

A global batch is ``G = ranks x batch_size`` consecutive samples of the epoch's order
(:mod:`translution_dist.data.order`); after ``S`` samples of the epoch, the next one is
``order[S : S + G]`` and rank ``r`` takes ``order[S + r*b : S + (r+1)*b]``. Batch ``i`` of an
iteration is made by DataLoader worker ``i % W``; the DataLoader's round-robin with in-order
delivery hands the batches out as ``0, 1, 2, ...`` -- the same batches with 0, 1 or ``W`` workers.
Each batch carries metadata (its first sample's place in the epoch, skip counts, its sample
ids) that :class:`~translution_dist.data.loader.ResumableLoader` strips off.

An unreadable sample (damaged shard, failed decode) keeps its slot: it is filled with a copy of
a readable sample of the same batch whose target is ``IGNORE_INDEX``, so batch shapes and the
samples consumed never change. A batch with no readable sample takes the next readable samples
of the order instead; none among the following ``_SCANNED_BATCHES`` batches' worth is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from translution_dist.data.decode import DECODE_ERRORS, Decoder
from translution_dist.data.order import EpochOrder
from translution_dist.data.sources import Counters, Source

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target of samples that only fill a slot: copies, evaluation padding (``F.cross_entropy``'s default)."""

_SCANNED_BATCHES = 3

Sample = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Position:
    """Where an iteration starts: the epoch, its samples already consumed, and its length in samples."""

    epoch: int
    consumed: int
    length: int


class RankBatches(IterableDataset):
    """Yields ``(inputs, targets, meta)``: rank ``rank``'s batches for the rest of one epoch.

    ``train`` shuffles (see :class:`EpochOrder`) and yields the whole global batches left, dropping a
    tail shorter than one; evaluation reads in order and pads the last global batch with repeats
    whose targets are ``IGNORE_INDEX``, so each sample counts once.
    """

    def __init__(
        self,
        source: Source,
        decoder: Decoder,
        *,
        rank: int,
        ranks: int,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        train: bool,
    ) -> None:
        self.source = source
        self.decoder = decoder
        self.rank = rank
        self.batch_size = batch_size
        self.global_batch = ranks * batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.train = train
        self.start = Position(0, 0, 0)

    def batches(self, position: Position) -> int:
        """Global batches an iteration from ``position`` yields."""
        if self.train:
            return (position.length - position.consumed) // self.global_batch
        return -(-(position.length - position.consumed) // self.global_batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.start
        order = EpochOrder(self.source.counts, seed=self.seed, epoch=start.epoch, shuffle=self.train,
                           shuffle_buffer=self.shuffle_buffer)
        for i in range(worker, self.batches(start), workers):
            first = start.consumed + i * self.global_batch
            counters = Counters()
            ids, samples = self._batch(order, first + self.rank * self.batch_size, start.length, counters)
            inputs, targets = map(torch.stack, zip(*samples))
            meta = torch.tensor([first, counters.skipped_shards, counters.skipped_samples, *ids])
            yield inputs, targets, meta

    def _batch(self, order: EpochOrder, first: int, length: int, counters: Counters) -> tuple[list[int], list[Sample]]:
        """The sample ids at ``order[first : first + batch_size]`` and their samples, unreadable slots filled."""
        positions = range(first, first + self.batch_size)
        ids = [order[k % length] for k in positions]
        slots = []
        for k, sample_id in zip(positions, ids):
            sample = self._read(order, sample_id, counters)
            if sample is not None and k >= length:  # evaluation padding
                sample = _ignored(sample)
            if sample is None and k < length:
                counters.skipped_samples += 1
            slots.append(sample)
        readable = [s for s in slots if s is not None]
        if not readable:
            readable = self._borrow(order, first + self.batch_size, length, counters)
            slots = readable[: self.batch_size] + [None] * (self.batch_size - len(readable))
        return ids, [s if s is not None else _ignored(readable[j % len(readable)]) for j, s in enumerate(slots)]

    def _borrow(self, order: EpochOrder, start: int, length: int, counters: Counters) -> list[Sample]:
        """Readable samples after a batch that has none; in training they are trained on (an all-ignored batch has
        no loss), in evaluation they only fill (counted at their own place)."""
        found: list[Sample] = []
        for k in range(start, start + _SCANNED_BATCHES * self.batch_size):
            sample = self._read(order, order[k % length], counters)
            if sample is not None:
                found.append(sample if self.train else _ignored(sample))
                if len(found) == self.batch_size:
                    break
        if not found:
            raise RuntimeError(
                f"rank {self.rank}: samples {start - self.batch_size}..{start + _SCANNED_BATCHES * self.batch_size - 1} "
                f"of epoch {order.epoch} are all unreadable: the shards holding them are damaged; "
                "check them with `translution data inspect`"
            )
        return found

    def _read(self, order: EpochOrder, sample_id: int, counters: Counters) -> Sample | None:
        shard, index = order.locate(sample_id)
        sample = self.source.get(shard, index, counters)
        if sample is None:
            return None
        try:
            return self.decoder(sample)
        except DECODE_ERRORS as exc:
            log.warning("skipping sample %s: %s: %s", sample.get("__key__"), type(exc).__name__, exc)
            return None


def _ignored(sample: Sample) -> Sample:
    x, y = sample
    return x, torch.full_like(y, IGNORE_INDEX)
