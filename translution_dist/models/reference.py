"""Naive, materializing forward passes of the relative attention layers.

Written straight from the formulas, the way the official code computes them: the bank is
gathered into an ``[N, N, C_in, C_out]`` tensor and per-pair queries, keys and values are
formed for the whole sequence. Exact but ``O(N²·C·C')`` in memory; the tests use it as the
ground truth and the benchmark as the baseline.

It indexes query banks in the official order (``query_index``), converting this project's
key-side storage with ``layout.mirror``, so it also checks that convention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from translution_dist.models.attention import AlphaTranslutionAttention, TranslutionAttention
from translution_dist.ops import DisplacementBank, RelativeLayout


def _per_pair(x: Tensor, weight: Tensor, index: Tensor, token_axis: str) -> Tensor:
    """``[B, N, N, C_out]`` projections of token ``i`` (query side) or ``j`` (key side)."""
    gathered = weight[index.clamp(min=0)]  # [N, N, C_in, C_out]
    return torch.einsum(f"b{token_axis}c,ijcd->bijd", x, gathered)


def _broadcast(projected: Tensor, token_axis: str) -> Tensor:
    n = projected.shape[1]
    return projected[:, :, None].expand(-1, -1, n, -1) if token_axis == "i" else projected[:, None].expand(-1, n, -1, -1)


def _official_order(bank: Tensor, layout: RelativeLayout, token_axis: str) -> Tensor:
    """Key banks are stored officially; query banks are stored mirrored."""
    return bank[layout.mirror.to(bank.device)] if token_axis == "i" else bank


def _side(x: Tensor, proj: torch.nn.Module, index: Tensor, token_axis: str, layout: RelativeLayout) -> Tensor:
    if isinstance(proj, DisplacementBank):
        return _per_pair(x, _official_order(proj.weight, layout, token_axis), index, token_axis)
    return _broadcast(proj(x), token_axis)


def _relative_scores(q: Tensor, k: Tensor, heads: int) -> Tensor:
    b, n, _, _ = q.shape
    return (q.view(b, n, n, heads, -1) * k.view(b, n, n, heads, -1)).sum(-1).permute(0, 3, 1, 2)


def _weighted_values(attn: Tensor, v: Tensor) -> Tensor:
    b, heads, n, _ = attn.shape
    out = attn.permute(0, 2, 3, 1)[..., None] * v.view(b, n, n, heads, -1)
    return out.sum(2).reshape(b, n, -1)


def _softmax(scores: Tensor, layout: RelativeLayout) -> Tensor:
    key_index, _ = layout.index_maps(scores.shape[-1])
    return torch.softmax(scores.masked_fill(key_index.to(scores.device) < 0, float("-inf")), dim=-1)


def naive_translution(layer: TranslutionAttention, x: Tensor) -> Tensor:
    key_index, query_index = (t.to(x.device) for t in layer.layout.index_maps(x.shape[1]))
    h = layer.norm(x)
    q = _side(h, layer.q_proj, query_index, "i", layer.layout)
    k = _side(h, layer.k_proj, key_index, "j", layer.layout)
    v = _side(h, layer.v_proj, key_index, "j", layer.layout)
    attn = _softmax(_relative_scores(q, k, layer.heads) * layer.scale, layer.layout)
    return layer.out_proj(_weighted_values(attn, v))


def naive_alpha_translution(layer: AlphaTranslutionAttention, x: Tensor) -> Tensor:
    key_index, query_index = (t.to(x.device) for t in layer.layout.index_maps(x.shape[1]))
    b, n, _ = x.shape
    h = layer.norm(x)
    q1, k1, v1 = (t.view(b, n, layer.heads, -1).transpose(1, 2) for t in layer.qkv_proj(h).chunk(3, dim=-1))
    q2 = _per_pair(layer.q_down(h), _official_order(layer.q_bank.weight, layer.layout, "i"), query_index, "i")
    k2 = _per_pair(layer.k_down(h), layer.k_bank.weight, key_index, "j")
    v2 = _per_pair(layer.v_down(h), layer.v_bank.weight, key_index, "j")
    scores = (q1 @ k1.transpose(-1, -2) + _relative_scores(q2, k2, layer.heads)) / 2 * layer.scale
    attn = _softmax(scores, layer.layout)
    out1 = (attn @ v1).transpose(1, 2).reshape(b, n, -1)
    out2 = layer.v_up(_weighted_values(attn, v2))
    return layer.out_proj((out1 + out2) / 2)
