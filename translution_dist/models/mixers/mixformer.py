"""MixFormer's mixing block (Chen et al., "MixFormer: Mixing Features across Windows and Dimensions", CVPR 2022).

Local-window attention runs in parallel with a depthwise convolution, and each branch modulates
the other:

* branches: ``a = W_a x`` (``h`` heads of ``d/2``: ``A = C'/2`` channels) and
  ``c = GELU(DWConv₃(W_c x))`` (``C`` channels);
* channel interaction (convolution → attention): ``s = σ(W₂ GELU(W₁ GAP(c)))`` ∈ ℝ^A scales the
  attention's values, ``v ← v ⊙ s``;
* window attention: ``o_i = Σ_{j∈win(i)} softmax_j(q_i·k_j/√(d/2)) v_j`` within non-overlapping
  ``w×w`` windows (``w = model.mixer_kernel``), ``q, k, v = W_qkv a``;
* spatial interaction (attention → convolution): ``m = σ(W₄ GELU(W₃ o))`` ∈ ℝ^{N×1} scales the
  convolution branch, ``c' = (W_p c) ⊙ m`` (``A`` channels);
* output: ``out_proj([o; c'])``.

Choices the paper leaves open (or that a class token needs): the paper's BatchNorms and the
LayerNorms after its branch projections are left out (the layer is pre-normed by one LayerNorm,
as every layer here); the reductions are ``C/8`` (channel) and ``A/8`` (spatial, the paper's
``C/16`` of the full width); the class token attends to every token and every window contains it,
the depthwise convolution gives it its centre tap, and GAP averages the patches only; windows at
the grid's edge are cut short when ``w`` does not divide the grid.
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
from translution_dist.models.mixers.uniformer import GridDepthwiseConv
from translution_dist.ops import ImageGridLayout

CONV_KERNEL = 3
"""The depthwise convolution's side, as the paper's."""
REDUCTION = 8
"""Hidden width of the interactions: ``C/8`` (channel) and ``A/8`` (spatial)."""


def window_partition_mask(layout: ImageGridLayout, window: int) -> Tensor:
    """``[N, N]`` bool: ``i`` may attend to ``j`` (same ``w×w`` window, or either is the class token)."""
    rows = torch.arange(layout.height).repeat_interleave(layout.width) // window
    cols = torch.arange(layout.width).repeat(layout.height) // window
    mask = torch.ones(layout.max_tokens, layout.max_tokens, dtype=torch.bool)
    mask[1:, 1:] = (rows[:, None] == rows[None]) & (cols[:, None] == cols[None])
    return mask


def bottleneck(width: int, out: int) -> nn.Sequential:
    """``W₂ GELU(W₁ ·)`` with hidden width ``width/8``: the interactions' two layers before the sigmoid."""
    hidden = max(1, width // REDUCTION)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out))


class MixFormerMixer(nn.Module):
    """Window attention ∥ depthwise convolution with channel and spatial interactions (see the module docstring)."""

    def __init__(self, layout: ImageGridLayout, dim: int, heads: int, dim_head: int, window: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(layout, ImageGridLayout):
            raise ValueError("MixFormer is defined on an image grid (arch=vit)")
        half = heads * dim_head // 2
        self.layout = layout
        self.window = window
        self.dim_head = dim_head // 2
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.attn_in = nn.Linear(dim, half)
        self.conv_in = nn.Linear(dim, dim)
        self.conv = GridDepthwiseConv(layout, dim, CONV_KERNEL)
        self.conv_out = nn.Linear(dim, half)
        self.qkv_proj = nn.Linear(half, 3 * half, bias=False)
        self.channel_interaction = bottleneck(dim, half)
        self.spatial_interaction = bottleneck(half, 1)
        self.out_proj = output_projection(heads, dim_head, dim)
        self.out_dropout = nn.Dropout(dropout)
        register_layout_buffer(self, "windows", window_partition_mask(layout, window))

    def reset_parameters(self) -> None:
        fill_layout_buffer(self, "windows", lambda: window_partition_mask(self.layout, self.window))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        conv = F.gelu(self.conv(self.conv_in(x)))
        channel_scale = torch.sigmoid(self.channel_interaction(conv[:, 1:].mean(dim=1, keepdim=True)))
        q, k, v = self.qkv_proj(self.attn_in(x)).chunk(3, dim=-1)
        heads = [_split_heads(t, self.dim_head) for t in (q, k, v * channel_scale)]
        dropout = self.dropout if self.training else 0.0
        attn = _merge_heads(F.scaled_dot_product_attention(*heads, attn_mask=self.windows, dropout_p=dropout))
        spatial_scale = torch.sigmoid(self.spatial_interaction(attn))
        mixed = torch.cat([attn, self.conv_out(conv) * spatial_scale], dim=-1)
        return self.out_dropout(self.out_proj(mixed))
