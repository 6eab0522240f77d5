"""ACmix (Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022).

Stage I: shared 1×1 projections give ``q, k, v`` (``h`` heads of width ``d``). Stage II, two
paths read them:

* attention: each query attends to the keys of its ``k×k`` window,
  ``a_i = softmax_j∈W(i)(q_i·k_j/√d) v_j``, per head;
* convolution: a fully connected layer over the ``3h`` head features makes ``k²`` maps per
  head, ``f_p = Σ_j w_{p,j} [q|k|v]_j`` (per channel), and the ``k×k`` convolution is their
  shifts and sums, ``c(x) = Σ_p f_p(x + δ_p)`` (zero outside the grid).

The output is ``out_proj(α·a + β·c)`` with learned scalars ``α, β`` (initialised to 1).

Choices the paper leaves open (or that a token sequence with a class token needs):

* The class token has no grid position: it attends to every token, every patch's window
  contains it, and its convolution path is the centre map ``f_0`` alone (a 1×1 kernel).
* The window is the in-grid part of ``k×k`` (masked attention), not the official code's
  reflection padding; the conv path pads with zeros.
* The shifts are fixed, as in the paper's formulation (the official code makes the shift
  kernels learnable, initialised as shifts). The attention path has no position encoding of
  its own; position comes from the convolution path (or ``position=learned``).
* ``out_proj`` (``Linear(h·d, C)``, as every attention layer here) follows the mix.
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
from translution_dist.ops import ImageGridLayout


def grid_window_mask(layout: ImageGridLayout, kernel_size: int) -> Tensor:
    """``[N, N]`` bool: token ``i`` may attend to ``j`` (same ``k×k`` window, or either is the class token)."""
    rows = torch.arange(layout.height).repeat_interleave(layout.width)
    cols = torch.arange(layout.width).repeat(layout.height)
    radius = kernel_size // 2
    near = ((rows[:, None] - rows[None]).abs() <= radius) & ((cols[:, None] - cols[None]).abs() <= radius)
    mask = torch.ones(layout.max_tokens, layout.max_tokens, dtype=torch.bool)
    mask[1:, 1:] = near
    return mask


def shift_and_sum(maps: Tensor, height: int, width: int) -> Tensor:
    """``Σ_p f_p(x + δ_p)`` over a grid: ``maps [B, H·W, c, k²]`` → ``[B, H·W, c]``, zeros outside the grid.

    Map ``p`` belongs to offset ``δ_p = (p // k − r, p % k − r)``; the shift is a slice of the
    zero-padded grid.
    """
    b, _, channels, k2 = maps.shape
    k = int(round(k2 ** 0.5))
    r = k // 2
    grid = maps.reshape(b, height, width, channels, k2).permute(0, 3, 4, 1, 2)  # [B, c, k², H, W]
    padded = F.pad(grid, (r, r, r, r))
    out = sum(padded[:, :, p, p // k:p // k + height, p % k:p % k + width] for p in range(k2))
    return out.flatten(2).transpose(1, 2)


class ACmix(nn.Module):
    """ACmix on a class token and a patch grid (see the module docstring for the formulas)."""

    def __init__(self, layout: ImageGridLayout, dim: int, heads: int, dim_head: int, kernel_size: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(layout, ImageGridLayout):
            raise ValueError("ACmix is defined on an image grid (arch=vit)")
        self.layout = layout
        self.heads = heads
        self.dim_head = dim_head
        self.kernel_size = kernel_size
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv_proj = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.shift_fc = nn.Linear(3 * heads, kernel_size ** 2 * heads, bias=False)
        self.alpha = nn.Parameter(torch.empty(1))  # 1-D: FSDP2 shards no scalars
        self.beta = nn.Parameter(torch.empty(1))
        self.out_proj = output_projection(heads, dim_head, dim)
        self.out_dropout = nn.Dropout(dropout)
        register_layout_buffer(self, "window", grid_window_mask(layout, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.alpha)
        nn.init.ones_(self.beta)
        fill_layout_buffer(self, "window", lambda: grid_window_mask(self.layout, self.kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_proj(self.norm(x)).chunk(3, dim=-1)
        heads = [_split_heads(t, self.dim_head) for t in (q, k, v)]
        dropout = self.dropout if self.training else 0.0
        attn = _merge_heads(F.scaled_dot_product_attention(*heads, attn_mask=self.window, dropout_p=dropout))
        return self.out_dropout(self.out_proj(self.alpha * attn + self.beta * self._convolution(heads)))

    def _convolution(self, heads: list[Tensor]) -> Tensor:
        """The conv path: ``k²`` maps per head from the ``3h`` head features, shifted and summed."""
        b, h, n, d = heads[0].shape
        k2 = self.kernel_size ** 2
        features = torch.cat(heads, dim=1).permute(0, 2, 3, 1)  # [B, N, d, 3h]
        maps = self.shift_fc(features).view(b, n, d, k2, h)  # map p of head t is output p·h + t
        patches = maps[:, 1:].permute(0, 1, 4, 2, 3).reshape(b, n - 1, h * d, k2)  # channels head-major
        grid = shift_and_sum(patches, self.layout.height, self.layout.width)
        cls = maps[:, :1, :, k2 // 2].transpose(-1, -2).reshape(b, 1, h * d)
        return torch.cat([cls, grid], dim=1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, kernel_size={self.kernel_size}"
