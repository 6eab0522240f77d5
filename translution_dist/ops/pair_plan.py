"""Displacement-major schedules of token pairs.

The operators never gather a bank per token pair. Instead they walk the displacement axis:
all pairs that share a key-side displacement use the same row of every bank (banks are
stored in key-side order, see :mod:`translution_dist.ops.layouts`), so one batched matrix
product per displacement computes their projections. Displacements are grouped into chunks
(padded to their longest), which bounds the memory of one step by the chunk and turns the
many small products into a few ``bmm`` calls.

A chunk is a run of displacements in order of decreasing pair count, so it pads little;
where the cuts go is chosen by dynamic programming, trading padded pairs against a fixed
cost per chunk. When a chunk's bank rows happen to form an arithmetic progression (the
storage order of a causal layout alternates light and heavy displacements, so most of its
runs do) the operators use a strided view of the bank instead of gathering its rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from translution_dist.ops.layouts import RelativeLayout, layout_by_id, layout_id

CHUNK_COST_PAIRS = 8
"""Fixed cost of one more chunk (op launches, Python), in units of one padded pair's work."""


@dataclass(frozen=True, eq=False)  # compared (and cached) by identity
class PairChunk:
    """A group of displacements whose pairs are processed together.

    Padding slots point at token ``n`` (a zero row the operators append) and at flat pair
    position ``n·n`` (a scratch slot), so they contribute nothing.
    """

    rows: torch.Tensor  # [D] rows of the bank (chunk) in hand, one per displacement, ascending
    query_tokens: torch.Tensor  # [D, P] query token i of each pair
    key_tokens: torch.Tensor  # [D, P] key token j of each pair
    flat_pairs: torch.Tensor  # [D·P] i·n + j of each pair
    row_slice: tuple[int, int, int] | None = None  # (start, stop, step) when rows == range(start, stop, step)

    @property
    def shape(self) -> tuple[int, int]:
        d, p = self.query_tokens.shape
        return d, p

    @property
    def query_index(self) -> torch.Tensor:
        """``[D·P]`` query tokens (a view: plain fields, no cached state to trace or lock)."""
        return self.query_tokens.view(-1)

    @property
    def key_index(self) -> torch.Tensor:
        return self.key_tokens.view(-1)

    @property
    def bank_slice(self) -> slice | None:
        return None if self.row_slice is None else slice(*self.row_slice)


@dataclass(frozen=True)
class Segments:
    """A scatter-add ``out[index] += src`` as sums over runs of equal targets, in a fixed order.

    ``order`` sorts the source rows by target (stably), ``lengths`` counts each distinct
    target's rows and ``targets`` names them; a segment sum then adds each target's rows in
    one fixed order and writes every target once, so the result does not depend on how a
    GPU schedules atomics.
    """

    order: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def of(cls, index: torch.Tensor) -> Segments:
        order = torch.argsort(index, stable=True)
        targets, lengths = torch.unique_consecutive(index[order], return_counts=True)
        return cls(order, lengths, targets)


@functools.lru_cache(maxsize=4096)
def chunk_segments(chunk: PairChunk) -> tuple[Segments, Segments]:
    """``(query, key)`` :class:`Segments` of a chunk, built on its device when first asked for.

    Only the deterministic mode uses them, so plans do not carry them otherwise.
    """
    return Segments.of(chunk.query_index), Segments.of(chunk.key_index)


@dataclass(frozen=True)
class PairPlan:
    """Every allowed pair of an ``n``-token sequence, for a set of key-side displacements.

    The range has ``num_rows`` bank rows; ``idle_rows`` are those no pair uses.
    """

    num_tokens: int
    chunks: tuple[PairChunk, ...]
    num_pairs: int
    num_rows: int
    idle_rows: torch.Tensor
    spec: PlanSpec | None = None  # how to build it again: what a compiled graph passes to the operators

    def to(self, device: torch.device) -> PairPlan:
        return _plan_on_device(self, device)


class PlanSpec(NamedTuple):
    """A plan named by ints only (a layout's registry id, ``n``, the chunk bound, the bank rows).

    This is what the kernels' custom operators take: a traced graph holds these constants,
    and the operator looks the plan up (built once, cached per device) when it runs.
    """

    layout: int
    num_tokens: int
    max_pairs: int
    start: int
    stop: int

    def plan(self, device: torch.device | None = None) -> PairPlan:
        plan = _build_plan(layout_by_id(self.layout), self.num_tokens, self.max_pairs, self.start, self.stop)
        return plan if device is None else plan.to(device)


_TENSOR_FIELDS = ("rows", "query_tokens", "key_tokens", "flat_pairs")


@functools.lru_cache(maxsize=256)
def _plan_on_device(plan: PairPlan, device: torch.device) -> PairPlan:
    if device.type == "cpu":
        return plan
    moved = tuple(
        replace(c, **{name: getattr(c, name).to(device, non_blocking=True) for name in _TENSOR_FIELDS})
        for c in plan.chunks
    )
    return replace(plan, chunks=moved, idle_rows=plan.idle_rows.to(device, non_blocking=True))


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
    return plan_spec(layout, num_tokens, max_pairs_per_chunk, rows).plan()


def plan_spec(layout: RelativeLayout, num_tokens: int, max_pairs_per_chunk: int,
              rows: tuple[int, int] | None = None) -> PlanSpec:
    """The :class:`PlanSpec` of :func:`pair_plan`'s plan (checked, not built)."""
    if max_pairs_per_chunk < 1:
        raise ValueError("max_pairs_per_chunk must be positive")
    start, stop = rows if rows is not None else (0, layout.num_displacements)
    if not 0 <= start <= stop <= layout.num_displacements:
        raise ValueError(f"rows {rows} outside 0..{layout.num_displacements}")
    return PlanSpec(layout_id(layout), num_tokens, max_pairs_per_chunk, start, stop)


@functools.lru_cache(maxsize=256)
def _build_plan(layout: RelativeLayout, n: int, max_pairs: int, start: int, stop: int) -> PairPlan:
    with torch.device("cpu"):  # plans are CPU tensors (moved by ``PairPlan.to``), also under a meta default
        return _plan_cpu(layout, n, max_pairs, start, stop)


def _plan_cpu(layout: RelativeLayout, n: int, max_pairs: int, start: int, stop: int) -> PairPlan:
    key_index, _ = layout.index_maps(n)
    flat_row = layout.storage_row[key_index.clamp(min=0)].flatten()
    in_range = (key_index.flatten() >= 0) & (flat_row >= start) & (flat_row < stop)
    pair_ids = torch.nonzero(in_range).flatten()
    row_of_pair = flat_row[pair_ids] - start

    order = torch.argsort(row_of_pair, stable=True)
    pair_ids = pair_ids[order]
    counts = torch.bincount(row_of_pair, minlength=stop - start)
    firsts = (torch.cumsum(counts, 0) - counts).tolist()
    counts_list = counts.tolist()

    rows = sorted((r for r in range(stop - start) if counts_list[r] > 0), key=lambda r: (-counts_list[r], r))
    groups = _cut(rows, counts_list, max_pairs)
    chunks = [_make_chunk(sorted(g), counts_list, firsts, pair_ids, n) for g in groups]
    chunks.sort(key=lambda c: -c.flat_pairs.numel())  # largest first: scratch buffers are sized once
    return PairPlan(
        num_tokens=n,
        chunks=tuple(chunks),
        num_pairs=int(pair_ids.numel()),
        num_rows=stop - start,
        idle_rows=torch.nonzero(counts == 0).flatten(),
        spec=PlanSpec(layout_id(layout), n, max_pairs, start, stop),
    )


def _cut(rows: list[int], counts: list[int], max_pairs: int) -> list[list[int]]:
    """Split ``rows`` (decreasing count) into runs of least padded pairs + ``CHUNK_COST_PAIRS`` per run."""
    m = len(rows)
    best = [0.0] + [float("inf")] * m
    cut_at = [0] * (m + 1)
    for end in range(1, m + 1):
        for begin in range(end - 1, -1, -1):
            padded = (end - begin) * counts[rows[begin]]  # the first row of a run is its longest
            if padded > max_pairs and end - begin > 1:
                break
            cost = best[begin] + CHUNK_COST_PAIRS + padded
            if cost < best[end]:
                best[end], cut_at[end] = cost, begin
    runs, end = [], m
    while end > 0:
        runs.append(rows[cut_at[end]:end])
        end = cut_at[end]
    return runs[::-1]


def _make_chunk(rows: list[int], counts: list[int], firsts: list[int], pair_ids: torch.Tensor, n: int) -> PairChunk:
    width = max(counts[r] for r in rows)
    flat = torch.full((len(rows), width), n * n, dtype=torch.long)
    for slot, r in enumerate(rows):
        flat[slot, :counts[r]] = pair_ids[firsts[r]:firsts[r] + counts[r]]
    pad = flat == n * n
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    strided = all(b - a == step for a, b in zip(rows, rows[1:]))
    query_tokens, key_tokens = torch.where(pad, n, flat // n), torch.where(pad, n, flat % n)
    return PairChunk(
        rows=torch.tensor(rows),
        query_tokens=query_tokens,
        key_tokens=key_tokens,
        flat_pairs=flat.flatten(),
        row_slice=(rows[0], rows[-1] + 1, step) if strided else None,
    )
