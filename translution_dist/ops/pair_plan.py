"""Displacement-major schedules of token pairs.

The operators never gather a bank per token pair. Instead they walk the displacement axis:
all pairs that share a key-side displacement ``d`` use the same row ``d`` of every bank
(banks are stored in key-side order, see :mod:`translution_dist.ops.layouts`), so one
batched matrix product per displacement computes their projections. Displacements are grouped into chunks of similar
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

    displacements: torch.Tensor  # [D] bank rows (key-side displacements)
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
            c.displacements, c.query_tokens, c.key_tokens, c.flat_pairs)))
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
    displacements: tuple[int, ...] | None = None,
) -> PairPlan:
    """The (cached) plan for ``num_tokens`` tokens.

    ``displacements`` restricts the plan to those key-side displacements (a bank shard or
    chunk); by default all ``K``. ``max_pairs_per_chunk`` bounds ``D·P`` of every chunk
    except one that holds a single displacement with more pairs than that.
    """
    if max_pairs_per_chunk < 1:
        raise ValueError("max_pairs_per_chunk must be positive")
    return _build_plan(layout, num_tokens, max_pairs_per_chunk, displacements)


@functools.lru_cache(maxsize=256)
def _build_plan(
    layout: RelativeLayout,
    n: int,
    max_pairs: int,
    displacements: tuple[int, ...] | None,
) -> PairPlan:
    key_index, _ = layout.index_maps(n)
    flat_key = key_index.flatten()
    allowed = flat_key >= 0
    pair_ids = torch.nonzero(allowed).flatten()
    disp_of_pair = flat_key[pair_ids]
    if displacements is not None:
        wanted = torch.zeros(layout.num_displacements, dtype=torch.bool)
        wanted[list(displacements)] = True
        keep = wanted[disp_of_pair]
        pair_ids, disp_of_pair = pair_ids[keep], disp_of_pair[keep]

    order = torch.argsort(disp_of_pair, stable=True)
    pair_ids, disp_of_pair = pair_ids[order], disp_of_pair[order]
    disps, counts = torch.unique_consecutive(disp_of_pair, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts

    # Largest groups first, so each chunk pads its groups to a similar length.
    by_size = torch.argsort(counts, descending=True, stable=True).tolist()
    chunks: list[PairChunk] = []
    group: list[int] = []
    for g in by_size:
        longest = int(counts[group[0]]) if group else int(counts[g])
        if group and (len(group) + 1) * longest > max_pairs:
            chunks.append(_make_chunk(group, disps, counts, starts, pair_ids, n))
            group = []
        group.append(g)
    if group:
        chunks.append(_make_chunk(group, disps, counts, starts, pair_ids, n))
    return PairPlan(num_tokens=n, chunks=tuple(chunks), num_pairs=int(pair_ids.numel()))


def _make_chunk(
    group: list[int],
    disps: torch.Tensor,
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
        displacements=disps[torch.tensor(group)],
        query_tokens=query_tokens,
        key_tokens=key_tokens,
        flat_pairs=flat.flatten(),
    )
