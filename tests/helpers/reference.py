"""Naive, materializing forward passes of the relative attention layers.

Written straight from the formulas, the way the official code computes them: the bank is
gathered into an ``[N, N, C_in, C_out]`` tensor and per-pair queries, keys and values are
formed for the whole sequence. Exact but ``O(N²·C·C')`` in memory; the tests use it as the
ground truth and the benchmark as the baseline. With ``per_sample_bank`` the per-pair
projections are one broadcast ``matmul`` of the tokens against the gathered bank, as the
official code forms them, which copies the gathered bank for every sample
(``O(B·N²·C·C')``): the figures the issue quotes for the official code come from that.

It indexes query banks in the official order (``query_index``), converting this project's
key-side storage with ``layout.mirror``, so it also checks that convention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from translution_dist.models.attention import AlphaTranslutionAttention, RelativeAttentionBase, TranslutionAttention


def _per_pair(x: Tensor, weight: Tensor, index: Tensor, token_axis: str, per_sample_bank: bool = False) -> Tensor:
    """``[B, N, N, C_out]`` projections of token ``i`` (query side) or ``j`` (key side)."""
    gathered = weight[index.clamp(min=0)]  # [N, N, C_in, C_out]
    if per_sample_bank:  # matmul broadcasts [1, N, N, C_in, C_out] to the batch by copying it
        tokens = x[:, :, None, None] if token_axis == "i" else x[:, None, :, None]
        return torch.matmul(tokens, gathered[None]).squeeze(3)
    return torch.einsum(f"b{token_axis}c,ijcd->bijd", x, gathered)


def _broadcast(projected: Tensor, token_axis: str) -> Tensor:
    n = projected.shape[1]
    return projected[:, :, None].expand(-1, -1, n, -1) if token_axis == "i" else projected[:, None].expand(-1, n, -1, -1)


def _official_order(layer: RelativeAttentionBase, side: str) -> Tensor:
    """A bank indexed as the formulas index it: query banks by the query-side displacement."""
    bank = layer.bank(side)
    return bank[layer.layout.mirror.to(bank.device)] if side == "q" else bank


def _side(layer: TranslutionAttention, side: str, x: Tensor, index: Tensor, per_sample_bank: bool) -> Tensor:
    token_axis = "i" if side == "q" else "j"
    if side in layer.relative:
        return _per_pair(x, _official_order(layer, side), index, token_axis, per_sample_bank)
    return _broadcast(getattr(layer, f"{side}_proj")(x), token_axis)


def _relative_scores(q: Tensor, k: Tensor, dim_head: int) -> Tensor:
    b, n, _, _ = q.shape
    return (q.view(b, n, n, -1, dim_head) * k.view(b, n, n, -1, dim_head)).sum(-1).permute(0, 3, 1, 2)


def _weighted_values(attn: Tensor, v: Tensor) -> Tensor:
    b, heads, n, _ = attn.shape
    out = attn.permute(0, 2, 3, 1)[..., None] * v.view(b, n, n, heads, -1)
    return out.sum(2).reshape(b, n, -1)


def _softmax(scores: Tensor, layout) -> Tensor:
    key_index, _ = layout.index_maps(scores.shape[-1])
    return torch.softmax(scores.masked_fill(key_index.to(scores.device) < 0, float("-inf")), dim=-1)


def naive_translution(layer: TranslutionAttention, x: Tensor, per_sample_bank: bool = False) -> Tensor:
    key_index, query_index = (t.to(x.device) for t in layer.layout.index_maps(x.shape[1]))
    h = layer.norm(x)
    q = _side(layer, "q", h, query_index, per_sample_bank)
    k = _side(layer, "k", h, key_index, per_sample_bank)
    v = _side(layer, "v", h, key_index, per_sample_bank)
    attn = _softmax(_relative_scores(q, k, layer.dim_head) * layer.scale, layer.layout)
    return layer.out_proj(_weighted_values(attn, v))


def naive_alpha_translution(layer: AlphaTranslutionAttention, x: Tensor) -> Tensor:
    """Any subset: a score side without a bank is its low-rank projection broadcast over the other token."""
    key_index, query_index = (t.to(x.device) for t in layer.layout.index_maps(x.shape[1]))
    b, n, _ = x.shape
    h = layer.norm(x)
    rel = layer.relative
    q1, k1, v1 = (t.view(b, n, -1, layer.dim_head).transpose(1, 2) for t in layer.qkv_proj(h).chunk(3, dim=-1))
    scores = q1 @ k1.transpose(-1, -2) * layer.scale
    if "q" in rel or "k" in rel:
        q2 = (_per_pair(layer.q_down(h), _official_order(layer, "q"), query_index, "i") if "q" in rel
              else _broadcast(layer.q_down(h), "i"))
        k2 = (_per_pair(layer.k_down(h), _official_order(layer, "k"), key_index, "j") if "k" in rel
              else _broadcast(layer.k_down(h), "j"))
        scores = (scores + _relative_scores(q2, k2, layer.rank) * layer.scale) / 2
    attn = _softmax(scores, layer.layout)
    out = (attn @ v1).transpose(1, 2).reshape(b, n, -1)
    if "v" in rel:
        v2 = _per_pair(layer.v_down(h), _official_order(layer, "v"), key_index, "j")
        out = (out + layer.v_up(_weighted_values(attn, v2))) / 2
    return layer.out_proj(out)
