"""Structure embedding by shift matrices (Andreoli, "Convolution, attention and structure embedding", 2019).

A grid convolution is ``Σ_δ S_δ X Θ_δ`` with ``S_δ`` the shift matrix of displacement ``δ``
(``[S_δ]_ij = 1`` iff ``j`` sits at displacement ``δ`` from ``i``); attention is the same with an
adaptive, data-dependent structure ``A(X)`` in place of the shifts. Structure embedding gives
attention the grid's structure as a learned combination of shift matrices, per head ``t``:

    out_t = (softmax(Q_t K_tᵀ/√d) + Σ_δ λ_{δ,t} S_δ) V_t

instead of a position embedding. The displacements are the layout's (``RelativeLayout``): the
``(2H−1)(2W−1)`` patch offsets and the class token's three relations on an image grid, the
``T`` causal offsets of a text window (masked pairs have no shift matrix).

Choices the paper leaves open: the shift combination is added to the softmax-normalised
attention (outside the softmax, so it is a convolution of the values and not a score bias);
``λ`` starts from a truncated normal of std 0.02, like a relative-bias table; dropout acts on the
attention probabilities only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translution_dist.models.attention import (
    _merge_heads,
    _split_heads,
    fill_layout_buffer,
    output_projection,
    register_layout_buffer,
)
from translution_dist.ops import RelativeLayout


class ShiftStructureAttention(nn.Module):
    """Self-attention plus ``Σ_δ λ_δ S_δ`` per head (see the module docstring)."""

    def __init__(self, layout: RelativeLayout, dim: int, heads: int, dim_head: int, causal: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.layout = layout
        self.dim_head = dim_head
        self.causal = causal
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv_proj = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.structure = nn.Parameter(torch.empty(layout.num_displacements, heads))  # λ_{δ,t}
        self.out_proj = output_projection(heads, dim_head, dim)
        self.out_dropout = nn.Dropout(dropout)
        register_layout_buffer(self, "key_index", self._key_index())
        self.reset_parameters()

    def _key_index(self) -> Tensor:
        """``[T, T]``: the displacement of pair ``(i, j)``, −1 where the pair is masked."""
        return self.layout.index_maps(self.layout.max_tokens)[0]

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.structure, std=0.02)
        fill_layout_buffer(self, "key_index", self._key_index)

    def shift_combination(self, n: int) -> Tensor:
        """``[h, n, n]``: ``Σ_δ λ_{δ,t} S_δ`` for every head ``t``."""
        key_index = self.key_index[:n, :n]
        shifts = self.structure[key_index.clamp(min=0)].permute(2, 0, 1)
        return shifts.masked_fill(key_index < 0, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(t, self.dim_head) for t in self.qkv_proj(self.norm(x)).chunk(3, dim=-1))
        dropout = self.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        out = attn + self.shift_combination(x.shape[1]).to(v.dtype) @ v
        return self.out_dropout(self.out_proj(_merge_heads(out)))
