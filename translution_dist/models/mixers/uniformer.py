"""UniFormer's relation aggregator (Li et al., "UniFormer: Unifying Convolution and Self-attention", 2022).

A UniFormer block is ``X = DPE(X_in) + X_in``, ``Y = MHRA(Norm(X)) + X``, then the
feed-forward. The multi-head relation aggregator is ``MHRA(X) = [A_1 V_1(X); …; A_N V_N(X)] U``:

* local MHRA (shallow blocks): ``A(X_i, X_j) = a^{i−j}`` for ``j`` in the ``k×k`` neighbourhood
  of ``i`` — a learned affinity per relative position, independent of the tokens: a depthwise
  ``k×k`` convolution of ``V(X)``;
* global MHRA (deep blocks): ``A(X_i, X_j) = softmax_j(Q(X_i)·K(X_j)/√d)`` — self-attention.

DPE, the dynamic position embedding, is a 3×3 depthwise convolution of the tokens (zero padded).
As a residual branch of this project's blocks the mixer returns ``DPE(x) + MHRA(x + DPE(x))``, so
that the block's ``x + branch`` is UniFormer's ``X + MHRA(Norm(X))`` with ``X = x + DPE(x)``.

Choices the paper leaves open (or that a class token needs):

* The class token has no grid position: each depthwise convolution gives it its centre tap
  (a 1×1 kernel) and its bias.
* The affinity is per channel (a depthwise convolution, as the paper's PWConv–DWConv–PWConv
  instance) rather than one per head; ``V`` and ``U`` are linear maps with biases, pre-normed
  by a LayerNorm (the paper's local blocks use BatchNorm).
* Which blocks are local: the first ``model.local_blocks`` (default half the depth); the
  paper's four stages of decreasing resolution become one resolution here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from translution_dist.models.attention import SelfAttention, output_projection
from translution_dist.ops import ImageGridLayout

POSITION_KERNEL = 3
"""DPE's depthwise kernel side, as the paper's."""


class GridDepthwiseConv(nn.Module):
    """A ``k×k`` depthwise convolution (with bias) of the patch grid; the class token gets the centre tap."""

    def __init__(self, layout: ImageGridLayout, channels: int, kernel_size: int) -> None:
        super().__init__()
        if not isinstance(layout, ImageGridLayout):
            raise ValueError("UniFormer's convolutions are defined on an image grid (arch=vit)")
        self.layout = layout
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        grid = x[:, 1:].transpose(1, 2).reshape(b, c, self.layout.height, self.layout.width)
        patches = self.conv(grid).flatten(2).transpose(1, 2)
        centre = self.conv.kernel_size[0] // 2
        cls = x[:, :1] * self.conv.weight[:, 0, centre, centre] + self.conv.bias
        return torch.cat([cls, patches], dim=1)


class LocalRelationAggregator(nn.Module):
    """Local MHRA: ``U(DWConv_k(V(Norm(x))))`` — a token-independent affinity over the ``k×k`` neighbourhood."""

    def __init__(self, layout: ImageGridLayout, dim: int, heads: int, dim_head: int, kernel_size: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.v_proj = nn.Linear(dim, inner)
        self.affinity = GridDepthwiseConv(layout, inner, kernel_size)
        self.out_proj = output_projection(heads, dim_head, dim)
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_dropout(self.out_proj(self.affinity(self.v_proj(self.norm(x)))))


class UniFormerMixer(nn.Module):
    """``DPE(x) + MHRA(x + DPE(x))``: local MHRA in shallow blocks, global MHRA (self-attention) in deep ones."""

    def __init__(self, layout: ImageGridLayout, dim: int, heads: int, dim_head: int, local: bool,
                 kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.position = GridDepthwiseConv(layout, dim, POSITION_KERNEL)
        self.aggregator = (LocalRelationAggregator(layout, dim, heads, dim_head, kernel_size, dropout) if local
                           else SelfAttention(layout, dim, heads, dim_head, "none", False, dropout))

    def forward(self, x: Tensor) -> Tensor:
        dpe = self.position(x)
        return dpe + self.aggregator(x + dpe)
