"""Relative layouts: which bank entry each (query, key) token pair uses.

A layout is a pure index map, independent of any weights. For query token ``i`` and key
token ``j`` it names the *key-side* displacement ``key_index[i, j]`` (the bank entry used
by the key and value projections of ``x_j``) and the *query-side* entry
``query_index[i, j]`` (the bank entry used by the query projection of ``x_i``).
Pairs a layout does not allow (the future, in a causal layout) are marked ``-1``.

The query side of a pair is always the key side of the reversed pair: ``query_index[i, j] =
mirror[key_index[i, j]]`` for an involution ``mirror`` of the displacements. This project
stores the query bank in key-side order (row ``d`` holds official row ``mirror[d]``), so
that all three banks of one displacement serve the same set of pairs: a displacement chunk
or shard then holds every matrix its pairs need.

Index conventions follow the official Translution code, so that its weights import:

* :class:`ImageGridLayout` — ``N = H·W + 1`` tokens, a class token first, then patches in
  row-major order; ``K = (2H−1)(2W−1) + 3``. For patches ``a = (xa, ya)`` and ``c = (xc, yc)``
  ``idx(a, c) = (xa − xc + H − 1)(2W − 1) + (ya − yc + W − 1)``; ``idx(cls, cls) = K−3``,
  ``idx(cls, patch) = K−2``, ``idx(patch, cls) = K−1``. The key side uses ``idx(i, j)`` and the
  query side ``idx(j, i)``.
* :class:`CausalLayout` — a causal window of ``T`` tokens; ``K = T``. The key side uses
  ``i − j`` and the query side ``T − 1 − (i − j)``; pairs with ``j > i`` are masked. Any
  sequence length ``n ≤ T`` is allowed.
"""

from __future__ import annotations

import bisect
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class RelativeLayout(ABC):
    """Geometry of the displacement axis ``K`` of a bank."""

    @property
    @abstractmethod
    def num_displacements(self) -> int:
        """``K``: the number of matrices in one bank."""

    @property
    @abstractmethod
    def max_tokens(self) -> int:
        """The longest sequence this layout indexes."""

    @property
    @abstractmethod
    def mirror(self) -> torch.Tensor:
        """``[K]``: the displacement of the reversed pair (an involution)."""

    @abstractmethod
    def _index_maps(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_index, query_index)``, each ``[n, n]`` long, ``-1`` where masked."""

    def index_maps(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(key_index, query_index)`` for a sequence of ``n`` tokens (CPU tensors)."""
        if not 1 <= n <= self.max_tokens:
            raise ValueError(f"sequence length {n} outside 1..{self.max_tokens} for {self}")
        return _cached_index_maps(self, n)

    @functools.cached_property
    def storage_order(self) -> torch.Tensor:
        """``[K]``: the displacement stored in each bank row.

        Chosen greedily so that the running pair count of rows ``0..r`` tracks ``(r+1)·mean``:
        then every contiguous range of rows carries pairs in proportion to its length.
        """
        counts = self.pair_counts().tolist()
        mean = sum(counts) / len(counts)
        remaining = sorted((count, d) for d, count in enumerate(counts))
        order, total = [], 0
        for row in range(len(counts)):
            want = (row + 1) * mean - total
            i = bisect.bisect_left(remaining, (want, -1))
            pick = min((j for j in (i - 1, i) if 0 <= j < len(remaining)),
                       key=lambda j: abs(remaining[j][0] - want))
            count, d = remaining.pop(pick)
            order.append(d)
            total += count
        return torch.tensor(order, device="cpu")

    @functools.cached_property
    def storage_row(self) -> torch.Tensor:
        """``[K]``: the bank row of each displacement (inverse of :attr:`storage_order`)."""
        rows = torch.empty_like(self.storage_order)
        rows[self.storage_order] = torch.arange(len(rows), device="cpu")
        return rows

    def attention_mask(self, n: int) -> torch.Tensor | None:
        """``[n, n]`` bool, True where a pair is allowed; ``None`` when every pair is.

        A host tensor, built once per ``n``: layers keep their own copy on the device
        (a buffer) rather than calling this per step.
        """
        key_index, _ = self.index_maps(n)
        allowed = key_index >= 0
        return None if self.all_pairs_allowed else allowed

    @property
    def all_pairs_allowed(self) -> bool:
        """Whether every (query, key) pair is allowed at every length (no mask needed)."""
        return True

    def pair_counts(self, n: int | None = None) -> torch.Tensor:
        """Number of token pairs that use each key-side displacement, shape ``[K]``."""
        key_index, _ = self.index_maps(n or self.max_tokens)
        valid = key_index[key_index >= 0]
        return torch.bincount(valid, minlength=self.num_displacements)


_LAYOUTS: list[RelativeLayout] = []
_LAYOUT_IDS: dict[RelativeLayout, int] = {}


def layout_id(layout: RelativeLayout) -> int:
    """A process-wide int naming ``layout`` (equal layouts share one): how compiled graphs refer to it."""
    if layout not in _LAYOUT_IDS:
        _LAYOUT_IDS[layout] = len(_LAYOUTS)
        _LAYOUTS.append(layout)
    return _LAYOUT_IDS[layout]


def layout_by_id(index: int) -> RelativeLayout:
    """The layout :func:`layout_id` named ``index``."""
    return _LAYOUTS[index]


@functools.lru_cache(maxsize=64)
def _cached_index_maps(layout: RelativeLayout, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.device("cpu"):  # index maps are small CPU tensors, also when a model is built on meta
        return layout._index_maps(n)


@dataclass(frozen=True)
class ImageGridLayout(RelativeLayout):
    """An ``height × width`` patch grid preceded by one class token."""

    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid must be at least 1x1, got {self.height}x{self.width}")

    @property
    def num_patch_displacements(self) -> int:
        return (2 * self.height - 1) * (2 * self.width - 1)

    @property
    def num_displacements(self) -> int:
        return self.num_patch_displacements + 3

    @property
    def max_tokens(self) -> int:
        return self.height * self.width + 1

    @property
    def mirror(self) -> torch.Tensor:
        k, patch = self.num_displacements, self.num_patch_displacements
        return torch.cat([torch.arange(patch - 1, -1, -1, device="cpu"), torch.tensor([k - 3, k - 1, k - 2], device="cpu")])

    def _index_maps(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n != self.max_tokens:
            raise ValueError(f"an image grid of {self.height}x{self.width} needs {self.max_tokens} tokens, got {n}")
        rows = torch.arange(self.height).repeat_interleave(self.width)
        cols = torch.arange(self.width).repeat(self.height)
        dx = rows[:, None] - rows[None, :] + self.height - 1
        dy = cols[:, None] - cols[None, :] + self.width - 1
        patch = dx * (2 * self.width - 1) + dy
        k = self.num_displacements
        key_index = torch.empty(n, n, dtype=torch.long)
        key_index[1:, 1:] = patch
        key_index[0, 0] = k - 3
        key_index[0, 1:] = k - 2
        key_index[1:, 0] = k - 1
        return key_index, key_index.t().contiguous()


@dataclass(frozen=True)
class CausalLayout(RelativeLayout):
    """A causal text window of ``context_length`` tokens."""

    context_length: int

    def __post_init__(self) -> None:
        if self.context_length < 1:
            raise ValueError(f"context_length must be positive, got {self.context_length}")

    @property
    def num_displacements(self) -> int:
        return self.context_length

    @property
    def max_tokens(self) -> int:
        return self.context_length

    @property
    def mirror(self) -> torch.Tensor:
        return torch.arange(self.context_length - 1, -1, -1, device="cpu")

    @property
    def all_pairs_allowed(self) -> bool:
        return self.context_length == 1

    def _index_maps(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(n)
        delta = pos[:, None] - pos[None, :]
        causal = delta >= 0
        key_index = torch.where(causal, delta, -1)
        query_index = torch.where(causal, self.context_length - 1 - delta, -1)
        return key_index, query_index
