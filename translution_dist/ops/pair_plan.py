"""Displacement-major schedules of token pairs.

The operators never gather a bank per token pair. Instead they walk the displacement axis:
all pairs that share a key-side displacement use the same row of every bank (banks are
stored in key-side order, see :mod:`translution_dist.ops.layouts`), so one batched matrix
product per displacement computes their projections. Displacements are grouped into chunks of similar
pair count (padded to the longest), which bounds the memory of one step by the chunk and
turns the many small products into a few ``bmm`` calls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from translution_dist.ops.layouts import RelativeLayout


@dataclass(frozen=True)
class PairChunk:
    """A group of displacements whose pairs are processed together.

    Padding slots point at token ``n`` (a zero row the operators append) and at flat pair
    position ``n·n`` (a scratch slot), so they contribute nothing.
    """

    rows: torch.Tensor  # [D] rows of the bank (chunk) in hand, one per displacement
    query_tokens: torch.Tensor  # [D, P] query token i of each pair
    key_tokens: torch.Tensor  # [D, P] key token j of each pair
    flat_pairs: torch.Tensor  # [D·P] i·n + j of each pair

    @property
    def shape(self) -> tuple[int, int]:
        d, p = self.query_tokens.shape
        return d, p


@dataclass(frozen=True)
class PairPlan:
    """Every allowed pair of an ``n``-token sequence, for a set of key-side displacements."""

    num_tokens: int
    chunks: tuple[PairChunk, ...]
    num_pairs: int

    def to(self, device: torch.device) -> PairPlan:
        return _plan_on_device(self, device)


@functools.lru_cache(maxsize=256)
def _plan_on_device(plan: PairPlan, device: torch.device) -> PairPlan:
    if device.type == "cpu":
        return plan
    moved = tuple(
        PairChunk(*(t.to(device, non_blocking=True) for t in (
            c.rows, c.query_tokens, c.key_tokens, c.flat_pairs)))
        for c in plan.chunks
    )
    return PairPlan(plan.num_tokens, moved, plan.num_pairs)


def pairs_per_chunk(batch: int, bytes_per_pair_row: int, budget_bytes: int) -> int:
    """The largest power of two of pairs whose per-pair rows (one per sample) fit the budget."""
    pairs = max(1, budget_bytes // max(1, batch * bytes_per_pair_row))
    return 1 << (pairs.bit_length() - 1)


def pair_plan(
    layout: RelativeLayout,
    num_tokens: int,
    max_pairs_per_chunk: int,
    rows: tuple[int, int] | None = None,
) -> PairPlan:
    """The (cached) plan for ``num_tokens`` tokens.

    ``rows = (start, stop)`` restricts the plan to the displacements stored in those bank
    rows (a bank chunk or shard; see ``layout.storage_order``) and numbers them from
    ``start``; by default all ``K`` rows. ``max_pairs_per_chunk`` bounds ``D·P`` of every
    chunk except one that holds a single displacement with more pairs than that.
    """
    if max_pairs_per_chunk < 1:
        raise ValueError("max_pairs_per_chunk must be positive")
    start, stop = rows if rows is not None else (0, layout.num_displacements)
    if not 0 <= start <= stop <= layout.num_displacements:
        raise ValueError(f"rows {rows} outside 0..{layout.num_displacements}")
    return _build_plan(layout, num_tokens, max_pairs_per_chunk, start, stop)


@functools.lru_cache(maxsize=256)
def _build_plan(layout: RelativeLayout, n: int, max_pairs: int, start: int, stop: int) -> PairPlan:
    key_index, _ = layout.index_maps(n)
    flat_row = layout.storage_row[key_index.clamp(min=0)].flatten()
    in_range = (key_index.flatten() >= 0) & (flat_row >= start) & (flat_row < stop)
    pair_ids = torch.nonzero(in_range).flatten()
    row_of_pair = flat_row[pair_ids] - start

    order = torch.argsort(row_of_pair, stable=True)
    pair_ids, row_of_pair = pair_ids[order], row_of_pair[order]
    local_rows, counts = torch.unique_consecutive(row_of_pair, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts

    # Largest groups first, so each chunk pads its groups to a similar length.
    by_size = torch.argsort(counts, descending=True, stable=True).tolist()
    chunks: list[PairChunk] = []
    group: list[int] = []
    for g in by_size:
        longest = int(counts[group[0]]) if group else int(counts[g])
        if group and (len(group) + 1) * longest > max_pairs:
            chunks.append(_make_chunk(group, local_rows, counts, starts, pair_ids, n))
            group = []
        group.append(g)
    if group:
        chunks.append(_make_chunk(group, local_rows, counts, starts, pair_ids, n))
    return PairPlan(num_tokens=n, chunks=tuple(chunks), num_pairs=int(pair_ids.numel()))


def _make_chunk(
    group: list[int],
    local_rows: torch.Tensor,
    counts: torch.Tensor,
    starts: torch.Tensor,
    pair_ids: torch.Tensor,
    n: int,
) -> PairChunk:
    width = int(counts[group[0]])
    flat = torch.full((len(group), width), n * n, dtype=torch.long)
    for row, g in enumerate(group):
        start, count = int(starts[g]), int(counts[g])
        flat[row, :count] = pair_ids[start:start + count]
    pad = flat == n * n
    query_tokens = torch.where(pad, n, flat // n)
    key_tokens = torch.where(pad, n, flat % n)
    return PairChunk(
        rows=local_rows[torch.tensor(group)],
        query_tokens=query_tokens,
        key_tokens=key_tokens,
        flat_pairs=flat.flatten(),
    )
