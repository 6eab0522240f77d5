"""Which samples each data-parallel rank and stream reads: a pure, deterministic plan.

A split's samples, shards concatenated in a per-(seed, epoch, cycle) order, form one
"cycle" of the global stream. Rank ``r`` of ``R`` owns the contiguous part
``[r*N/R, (r+1)*N/R)`` of every cycle, and its streams split that part in proportion to
the batches they serve (batch ``i`` of an epoch comes from stream ``i % S``). A stream
that needs more samples than its range starts the next cycle (new shard order), so no
rank ever runs out, whatever the number of shards, and every rank serves exactly the
same number of batches per epoch. When the ranges are not exhausted, an epoch reads
disjoint samples on all ranks and streams. Ranges work on sample positions, so a split
with fewer shards than ranks x streams is shared by position, not by shard.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """One rank's epoch: its batch count and each stream's sample range within a cycle."""

    batches: int
    per_stream: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    samples: int
    """Samples of the split in use (a prefix of the split when evaluating on fewer)."""


def batches_per_stream(batches: int, streams: int) -> tuple[int, ...]:
    return tuple(len(range(s, batches, streams)) for s in range(streams))


def apportion(total: int, weights: Sequence[int]) -> list[tuple[int, int]]:
    """Split ``[0, total)`` into consecutive ranges proportional to ``weights``."""
    whole, cumulative, ranges = sum(weights), 0, []
    for weight in weights:
        start = total * cumulative // whole
        cumulative += weight
        ranges.append((start, total * cumulative // whole))
    return ranges


def stream_ranges(
    samples: int, rank: int, ranks: int, per_stream: Sequence[int], batch_size: int
) -> tuple[tuple[int, int], ...]:
    """Each stream's ``[lo, hi)`` within a cycle: rank part, split by batches served."""
    lo, hi = samples * rank // ranks, samples * (rank + 1) // ranks
    used = min(hi - lo, sum(per_stream) * batch_size)
    return tuple((lo + a, lo + b) for a, b in apportion(used, per_stream))


def make_plan(
    counts: Sequence[int],
    *,
    rank: int,
    ranks: int,
    streams: int,
    batch_size: int,
    samples_per_epoch: int | None,
    train: bool,
) -> Plan:
    """Plan one rank's epoch.

    Training: ``samples_per_epoch`` (default ``N // ranks``) rounded down to whole
    batches. Evaluation: just enough batches for every stream to cover its range once
    (over the first ``samples_per_epoch * ranks`` samples when given); the batches past a
    stream's range repeat samples, which readers mark so metrics count each sample once.
    """
    total = sum(counts)
    if total < ranks:
        raise ValueError(f"the split has {total} samples, fewer than the {ranks} data-parallel ranks")
    if train:
        samples = total
        per_rank = samples_per_epoch or total // ranks
        batches = per_rank // batch_size
        if batches < 1:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {per_rank} samples per rank per epoch "
                f"({total} samples over {ranks} ranks); lower it or raise data.samples_per_epoch"
            )
    else:
        samples = min(total, samples_per_epoch * ranks) if samples_per_epoch else total

        def covers(batches: int) -> bool:
            per_stream = batches_per_stream(batches, streams)
            return all(
                b - a <= n * batch_size
                for r in range(ranks)
                for (a, b), n in zip(stream_ranges(samples, r, ranks, per_stream, batch_size), per_stream)
            )

        batches = _ceil_div(_ceil_div(samples, ranks), batch_size)
        while not covers(batches):
            batches += 1
    per_stream = batches_per_stream(batches, streams)
    ranges = stream_ranges(samples, rank, ranks, per_stream, batch_size)
    if any(n and a == b for (a, b), n in zip(ranges, per_stream)):
        raise ValueError(
            f"{samples // ranks} samples per rank are too few for {streams} streams; "
            "lower data.streams_per_rank / data.num_workers"
        )
    return Plan(batches, per_stream, ranges, samples)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shard_order(num_shards: int, *, seed: int, epoch: int, cycle: int, shuffle: bool) -> list[int]:
    """The shard order of one cycle; identical on every rank."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}:{cycle}").shuffle(order)
    return order


def pieces(order: Sequence[int], counts: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` pieces covering positions ``[lo, hi)`` of the shards in ``order``."""
    result, offset = [], 0
    for shard in order:
        start, stop = max(lo - offset, 0), min(hi - offset, counts[shard])
        if start < stop:
            result.append((shard, start, stop))
        offset += counts[shard]
        if offset >= hi:
            break
    return result
