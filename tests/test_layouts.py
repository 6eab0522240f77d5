"""Index maps of the relative layouts, checked against the formulas of the issue/paper."""

from __future__ import annotations

import pytest
import torch

from translution_dist.ops import CausalLayout, ImageGridLayout, pair_plan


def test_image_grid_indices_follow_the_official_formula():
    h, w = 3, 5
    layout = ImageGridLayout(h, w)
    k = layout.num_displacements
    assert k == (2 * h - 1) * (2 * w - 1) + 3
    key_index, query_index = layout.index_maps(h * w + 1)
    for a in range(h * w):
        for c in range(h * w):
            (xa, ya), (xc, yc) = divmod(a, w), divmod(c, w)
            assert key_index[a + 1, c + 1] == (xa - xc + h - 1) * (2 * w - 1) + (ya - yc + w - 1)
    assert key_index[0, 0] == k - 3
    assert (key_index[0, 1:] == k - 2).all() and (key_index[1:, 0] == k - 1).all()
    assert torch.equal(query_index, key_index.t())


@pytest.mark.parametrize("layout", [ImageGridLayout(3, 4), ImageGridLayout(1, 1), CausalLayout(6)])
def test_mirror_maps_key_side_to_query_side(layout):
    n = layout.max_tokens
    key_index, query_index = layout.index_maps(n)
    allowed = key_index >= 0
    assert torch.equal(layout.mirror[key_index[allowed]], query_index[allowed])
    assert torch.equal(layout.mirror[layout.mirror], torch.arange(layout.num_displacements))


def test_causal_indices_and_short_sequences():
    layout = CausalLayout(6)
    key_index, query_index = layout.index_maps(4)
    for i in range(4):
        for j in range(4):
            if j > i:
                assert key_index[i, j] == -1 and query_index[i, j] == -1
            else:
                assert key_index[i, j] == i - j and query_index[i, j] == 6 - 1 - (i - j)
    assert layout.attention_mask(4) is not None and ImageGridLayout(2, 2).attention_mask(5) is None
    with pytest.raises(ValueError, match="outside 1..6"):
        layout.index_maps(7)


@pytest.mark.parametrize("layout", [ImageGridLayout(4, 4), CausalLayout(10)])
def test_pair_plan_covers_every_allowed_pair_once(layout):
    n = layout.max_tokens
    plan = pair_plan(layout, n, max_pairs_per_chunk=16)
    flat = torch.cat([c.flat_pairs for c in plan.chunks])
    flat = flat[flat < n * n]
    key_index, _ = layout.index_maps(n)
    expected = torch.nonzero((key_index >= 0).flatten()).flatten()
    assert torch.equal(flat.sort().values, expected)
    assert plan.num_pairs == expected.numel()
    assert int(layout.pair_counts().sum()) == expected.numel()
    for chunk in plan.chunks:
        d, p = chunk.shape
        assert d == 1 or d * p <= 16
        pairs = chunk.flat_pairs.view(d, p)
        for row_pairs, row in zip(pairs, chunk.rows):
            real = row_pairs[row_pairs < n * n]
            assert (key_index.flatten()[real] == layout.storage_order[row]).all()


def test_pair_plan_restricted_to_bank_rows():
    layout = CausalLayout(8)
    plan = pair_plan(layout, 8, 64, rows=(2, 4))
    assert sorted(torch.cat([c.rows for c in plan.chunks]).tolist()) == [0, 1]
    displacements = layout.storage_order[2:4].tolist()
    assert plan.num_pairs == sum(8 - d for d in displacements)


@pytest.mark.parametrize("layout", [CausalLayout(160), ImageGridLayout(14, 14), ImageGridLayout(7, 7)])
def test_storage_order_balances_contiguous_splits(layout):
    counts = layout.pair_counts()[layout.storage_order]
    assert sorted(layout.storage_order.tolist()) == list(range(layout.num_displacements))
    for parts in (p for p in (2, 4, 8) if layout.num_displacements // p >= 40):  # splits of 40+ rows
        loads = torch.stack([c.sum() for c in counts.chunk(parts)]).double()
        assert loads.max() / loads.mean() < 1.05, (parts, loads)


def test_natural_order_would_be_unbalanced():
    natural = torch.stack([c.sum() for c in CausalLayout(160).pair_counts().chunk(4)]).double()
    assert natural.max() / natural.mean() > 1.5
