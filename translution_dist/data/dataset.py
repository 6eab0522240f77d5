"""The per-rank iterable dataset: deterministic batches, in order, from any number of workers.

Batch ``i`` of an epoch is made by stream ``i % S`` from its own sample stream (see
:mod:`translution_dist.data.plan`), so its content depends on (seed, epoch, rank, S)
only. DataLoader worker ``d`` of ``W`` (``W`` divides ``S``) makes the batches
``start + d, start + d + W, ...``; the DataLoader's round-robin over workers with
in-order delivery then hands them out as ``start, start + 1, ...`` -- the same sequence
with 0, 1 or ``S`` workers. Each batch carries metadata (its index, its stream's raw
position, skip counts) that :class:`~translution_dist.data.loader.ResumableLoader`
strips off to keep the resumable state.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from translution_dist.data.decode import DECODE_ERRORS, Decoder
from translution_dist.data.plan import Plan, pieces, shard_order
from translution_dist.data.sources import Counters, Source

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target of evaluation samples that repeat an already counted one (``F.cross_entropy``'s default)."""

_EMPTY_PASSES = 3


@dataclass(frozen=True)
class Position:
    """Where an epoch resumes: batches already consumed and each stream's raw samples read."""

    epoch: int
    batch: int
    stream_positions: tuple[int, ...]


class _Stream:
    """One stream's samples with a count of how many were taken (skipped corrupt ones included)."""

    def __init__(self, samples: Iterator[tuple[dict[str, Any], int]], position: int) -> None:
        self.samples = itertools.islice(samples, position, None)
        self.position = position

    def take(self) -> tuple[dict[str, Any], int]:
        self.position += 1
        return next(self.samples)


class ShardStream(IterableDataset):
    """Yields ``(inputs, targets, meta)`` batches of one data-parallel rank for one epoch.

    ``train`` shuffles (shard order per epoch and cycle, plus a per-stream buffer);
    otherwise samples are read in order and those past a stream's range (repeats that
    only pad the last batches) get ``IGNORE_INDEX`` targets.
    """

    def __init__(
        self,
        source: Source,
        decoder: Decoder,
        plan: Plan,
        *,
        rank: int,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        train: bool,
    ) -> None:
        self.source = source
        self.decoder = decoder
        self.plan = plan
        self.rank = rank
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.train = train
        self.resume_from = Position(0, 0, (0,) * len(plan.per_stream))

    def __len__(self) -> int:
        return self.plan.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.resume_from
        streams_count = len(self.plan.per_stream)
        counters, reported = Counters(), Counters()
        streams: dict[int, _Stream] = {}
        for i in range(start.batch + worker, self.plan.batches, workers):
            s = i % streams_count
            if s not in streams:
                samples = self._samples(start.epoch, s, counters)
                streams[s] = _Stream(samples, start.stream_positions[s])
            inputs, targets = self._batch(streams[s], counters)
            meta = torch.tensor(
                [
                    i,
                    streams[s].position,
                    counters.skipped_shards - reported.skipped_shards,
                    counters.skipped_samples - reported.skipped_samples,
                ]
            )
            reported = Counters(counters.skipped_shards, counters.skipped_samples)
            yield inputs, targets, meta

    def _batch(self, stream: _Stream, counters: Counters) -> tuple[Tensor, Tensor]:
        inputs, targets = [], []
        while len(inputs) < self.batch_size:
            sample, cycle = stream.take()
            try:
                x, y = self.decoder(sample)
            except DECODE_ERRORS as exc:
                counters.skipped_samples += 1
                log.warning("skipping sample %s: %s: %s", sample.get("__key__"), type(exc).__name__, exc)
                continue
            if cycle > 0 and not self.train:
                y = torch.full_like(y, IGNORE_INDEX)
            inputs.append(x)
            targets.append(y)
        return torch.stack(inputs), torch.stack(targets)

    def _samples(self, epoch: int, stream: int, counters: Counters) -> Iterator[tuple[dict[str, Any], int]]:
        """Endless ``(raw sample, cycle)`` of one stream: its range in cycle 0, 1, 2, ..."""
        lo, hi = self.plan.ranges[stream]
        empty = 0
        for cycle in itertools.count():
            order = shard_order(len(self.source.counts), seed=self.seed, epoch=epoch, cycle=cycle, shuffle=self.train)
            samples = (
                sample
                for shard, a, b in pieces(order, self.source.counts, lo, hi)
                for sample in self.source.read(shard, a, b, counters)
            )
            if self.train and self.shuffle_buffer > 1:
                rng = random.Random(f"buffer:{self.seed}:{epoch}:{cycle}:{self.rank}:{stream}")
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            read = 0
            for sample in samples:
                read += 1
                yield sample, cycle
            empty = 0 if read else empty + 1
            if empty == _EMPTY_PASSES:
                raise RuntimeError(
                    f"rank {self.rank} stream {stream} read no sample in {_EMPTY_PASSES} passes over "
                    f"its share (samples {lo}..{hi} of each pass): its shards are unreadable; "
                    "check them with `translution data inspect`"
                )
