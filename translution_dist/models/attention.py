"""Attention layers: Translution, α-Translution and the self-attention baselines.

Every layer is pre-norm (it LayerNorms its input) and returns the residual branch. The
layers know nothing of parallelism: banks are plain parameters, and the only hooks that
sharding code uses are the attributes named in :class:`RelativeAttentionBase`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translution_dist.ops import (
    DisplacementBank,
    RelativeLayout,
    pair_plan,
    pair_scores,
    pair_values,
    pairs_per_chunk,
)

RELATIVE_SUBSETS = ("q", "k", "v", "qk", "qv", "kv", "qkv")
DEFAULT_CHUNK_BYTES = 64 << 20


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


class RelativeAttentionBase(nn.Module):
    """Shared machinery of the layers with displacement banks.

    Sharding code may set:

    * ``row_softmax`` — the softmax over keys (displacement parallelism completes it across
      the ranks that own the other displacements);
    * ``owned_displacements`` — the key-side displacements whose pairs this rank computes
      (``None``: all of them).
    """

    def __init__(self, layout: RelativeLayout, heads: int) -> None:
        super().__init__()
        self.layout = layout
        self.heads = heads
        self.chunk_bytes = DEFAULT_CHUNK_BYTES
        self.row_softmax: Callable[[Tensor, Tensor | None], Tensor] = _masked_softmax
        self.owned_displacements: tuple[int, ...] | None = None

    def plan_for(self, n: int, batch: int, bytes_per_pair_row: int):
        budget = pairs_per_chunk(batch, bytes_per_pair_row, self.chunk_bytes)
        return pair_plan(self.layout, n, budget, self.owned_displacements)


def _projection(relative: bool, num_displacements: int, dim: int, inner_dim: int) -> nn.Module:
    if relative:
        return DisplacementBank(num_displacements, dim, inner_dim)
    return nn.Linear(dim, inner_dim, bias=False)


class TranslutionAttention(RelativeAttentionBase):
    """Full Translution: each of the ``relative`` projections (a subset of q, k, v) is a bank
    ``[K, C, C']``; the others are plain ``Linear(C, C')``.

    ``q_ij = x_i·Wq[d(i,j)]``, ``k_ij = x_j·Wk[d(i,j)]``, ``v_ij = x_j·Wv[d(i,j)]`` with ``d``
    the key-side displacement (the query bank is stored in key-side order),
    ``a = softmax_j(⟨q_ij, k_ij⟩/√d_head)`` per head, ``o_i = Σ_j a_ij·v_ij``.
    """

    def __init__(self, layout: RelativeLayout, dim: int, heads: int, dim_head: int, relative: str = "qkv") -> None:
        super().__init__(layout, heads)
        if relative not in RELATIVE_SUBSETS:
            raise ValueError(f"relative must be one of {RELATIVE_SUBSETS}, got {relative!r}")
        inner_dim = heads * dim_head
        self.relative = relative
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        k = layout.num_displacements
        self.q_proj = _projection("q" in relative, k, dim, inner_dim)
        self.k_proj = _projection("k" in relative, k, dim, inner_dim)
        self.v_proj = _projection("v" in relative, k, dim, inner_dim)
        self.out_proj = nn.Linear(inner_dim, dim)

    def _side(self, name: str, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(input, bank)`` of a relative side, ``(projection, None)`` of a plain one."""
        proj = getattr(self, f"{name}_proj")
        if isinstance(proj, DisplacementBank):
            return x, proj.weight
        return proj(x), None

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        x = self.norm(x)
        inner = self.out_proj.in_features
        plan = self.plan_for(n, b, x.element_size() * 3 * (c + inner))
        mask = self.layout.attention_mask(n)
        xq, wq = self._side("q", x)
        xk, wk = self._side("k", x)
        xv, wv = self._side("v", x)
        if wq is None and wk is None:
            scores = _split_heads(xq, self.heads) @ _split_heads(xk, self.heads).transpose(-1, -2) * self.scale
        else:
            scores = pair_scores(xq, xk, wq, wk, plan, self.heads, self.scale)
        attn = self.row_softmax(scores, mask)
        if wv is None:
            out = _merge_heads(attn @ _split_heads(xv, self.heads))
        else:
            out = pair_values(attn, xv, wv, plan)
        return self.out_proj(out)


class AlphaTranslutionAttention(RelativeAttentionBase):
    """α-Translution: attention plus a rank-``r`` (per head) Translution term.

    ``s_ij = (⟨q1_i, k1_j⟩ + ⟨q2_ij, k2_ij⟩)/2/√d_head`` with ``q2_ij = (x_i·Dq)·Wq2[d(i,j)]``,
    ``k2_ij = (x_j·Dk)·Wk2[d(i,j)]``; ``o_i = to_out((Σ_j a_ij·v1_j + U·Σ_j a_ij·v2_ij)/2)``
    with ``v2_ij = (x_j·Dv)·Wv2[d(i,j)]``. ``D*`` are ``Linear(C, h·r)``, banks are
    ``[K, h·r, h·r]`` and ``U`` is ``Linear(h·r, C')``.
    """

    def __init__(self, layout: RelativeLayout, dim: int, heads: int, dim_head: int, rank: int = 8) -> None:
        super().__init__(layout, heads)
        inner_dim = heads * dim_head
        low = heads * rank
        k = layout.num_displacements
        self.rank = rank
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv_proj = nn.Linear(dim, 3 * inner_dim, bias=False)
        self.q_down = nn.Linear(dim, low, bias=False)
        self.k_down = nn.Linear(dim, low, bias=False)
        self.v_down = nn.Linear(dim, low, bias=False)
        self.q_bank = DisplacementBank(k, low, low)
        self.k_bank = DisplacementBank(k, low, low)
        self.v_bank = DisplacementBank(k, low, low)
        self.v_up = nn.Linear(low, inner_dim, bias=False)
        self.out_proj = nn.Linear(inner_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q1, k1, v1 = (_split_heads(t, self.heads) for t in self.qkv_proj(x).chunk(3, dim=-1))
        low = self.q_bank.in_features
        plan = self.plan_for(n, b, x.element_size() * 6 * low)
        half_scale = self.scale / 2
        scores = q1 @ k1.transpose(-1, -2) * half_scale
        scores = scores + pair_scores(
            self.q_down(x), self.k_down(x), self.q_bank.weight, self.k_bank.weight, plan, self.heads, half_scale)
        attn = self.row_softmax(scores, self.layout.attention_mask(n))
        out1 = _merge_heads(attn @ v1)
        out2 = self.v_up(pair_values(attn, self.v_down(x), self.v_bank.weight, plan))
        return self.out_proj((out1 + out2) / 2)


class SelfAttention(nn.Module):
    """The paper's self-attention baseline; ``position`` is ``none``, ``rope`` or ``relative_bias``.

    (A learned absolute position embedding belongs to the model, not the layer.)
    """

    def __init__(self, layout: RelativeLayout, dim: int, heads: int, dim_head: int, position: str = "none",
                 causal: bool = False) -> None:
        super().__init__()
        if position not in ("none", "rope", "relative_bias"):
            raise ValueError(f"position must be none, rope or relative_bias, got {position!r}")
        inner_dim = heads * dim_head
        self.layout = layout
        self.heads = heads
        self.position = position
        self.causal = causal
        self.norm = nn.LayerNorm(dim)
        self.qkv_proj = nn.Linear(dim, 3 * inner_dim, bias=False)
        self.out_proj = nn.Linear(inner_dim, dim)
        if position == "relative_bias":
            self.bias_table = nn.Parameter(torch.zeros(layout.num_displacements, heads))
            nn.init.trunc_normal_(self.bias_table, std=0.02)
        if position == "rope":
            if dim_head % 4:
                raise ValueError(f"rope needs dim_head divisible by 4, got {dim_head}")
            self.register_buffer("rope_freqs", _rope_frequencies(dim_head // _rope_axes(layout)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv_proj(self.norm(x)).chunk(3, dim=-1))
        mask = None
        if self.position == "rope":
            positions = _rope_positions(self.layout, n).to(x.device)
            q, k = _apply_rope(q, positions, self.rope_freqs), _apply_rope(k, positions, self.rope_freqs)
        if self.position == "relative_bias":
            key_index, _ = self.layout.index_maps(n)
            key_index = key_index.to(x.device)
            mask = self.bias_table[key_index.clamp(min=0)].permute(2, 0, 1).to(q.dtype)
            if self.causal:
                mask = mask.masked_fill(key_index < 0, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.out_proj(_merge_heads(out))


def _rope_axes(layout: RelativeLayout) -> int:
    return 1 if not hasattr(layout, "height") else 2


def _rope_frequencies(rotary_dim: int) -> Tensor:
    return 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def _rope_positions(layout: RelativeLayout, n: int) -> Tensor:
    """``[n, axes]`` positions: the token index for text; (row, col) for patches, the class token at the origin."""
    if _rope_axes(layout) == 1:
        return torch.arange(n, dtype=torch.float32)[:, None]
    rows = torch.arange(layout.height).repeat_interleave(layout.width)
    cols = torch.arange(layout.width).repeat(layout.height)
    grid = torch.stack([rows, cols], dim=1).float() + 1
    return torch.cat([torch.zeros(1, 2), grid], dim=0)


def _apply_rope(x: Tensor, positions: Tensor, freqs: Tensor) -> Tensor:
    """Rotary embedding; for 2-D positions the head dimension is split between the axes."""
    parts = x.chunk(positions.shape[1], dim=-1)
    rotated = []
    for axis, part in enumerate(parts):
        angles = positions[:, axis, None] * freqs.to(x.device)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        even, odd = part[..., 0::2], part[..., 1::2]
        rotated.append(torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2))
    return torch.cat(rotated, dim=-1)
