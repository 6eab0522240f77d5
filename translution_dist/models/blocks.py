"""The encoder shared by the ViT and the GPT: pre-norm blocks and a final LayerNorm.

Layout of the official ``TNN``/``Transformer`` encoder: each block adds an attention
branch and then a feed-forward branch to the residual stream, each branch normalising
its own input; the encoder ends with a LayerNorm.
"""

from __future__ import annotations

from torch import Tensor, nn

from translution_dist.models.attention import (
    AlphaTranslutionAttention,
    RotaryEmbedding,
    SelfAttention,
    TranslutionAttention,
)
from translution_dist.models.config import MIXERS, ModelConfig
from translution_dist.models.mixers import make_mixer
from translution_dist.ops import RelativeLayout


class FeedForward(nn.Module):
    """LayerNorm → Linear(C, mlp) → GELU → dropout → Linear(mlp, C) → dropout, the branch's own pre-norm included."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.down_proj = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(self.dropout(self.act(self.up_proj(self.norm(x))))))


class Block(nn.Module):
    """``x + attn(x)``, then ``+ ff(·)``; both branches are pre-norm."""

    def __init__(self, attn: nn.Module, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = attn
        self.ff = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.ff(x)


def make_attention(cfg: ModelConfig, layout: RelativeLayout, causal: bool, relative: bool = True,
                   index: int = 0) -> nn.Module:
    """The attention layer or mixer ``cfg`` asks for (``causal`` only matters to self-attention).

    ``relative=False`` gives a hybrid's plain block: self-attention without position information.
    ``index``: the block's place in the encoder (a mixer may differ by depth, as UniFormer's).
    """
    if cfg.attention in MIXERS:
        return make_mixer(cfg, layout, causal, index)
    d = cfg.dims
    rotary = RotaryEmbedding(layout, d.dim_head, cfg.rope_convention) if cfg.rotary else None
    if relative and cfg.attention == "translution":
        return TranslutionAttention(layout, d.dim, d.heads, d.dim_head, cfg.relative, cfg.bank_chunks, cfg.dropout,
                                    rotary)
    if relative and cfg.attention == "alpha":
        return AlphaTranslutionAttention(layout, d.dim, d.heads, d.dim_head, cfg.alpha_rank, cfg.bank_chunks,
                                         cfg.relative, cfg.dropout, rotary)
    position = cfg.resolved_position if cfg.attention == "self_attention" else "none"
    position = {"learned": "none", "learned+rope": "rope"}.get(position, position)
    return SelfAttention(layout, d.dim, d.heads, d.dim_head, position, causal, cfg.dropout, cfg.rope_convention)


class Encoder(nn.Module):
    """``depth`` blocks and the final LayerNorm (the official ``translution``/``transformer`` module).

    A hybrid (``relative_blocks``, the official ``tln_num``) has the relative attention in its
    first blocks and self-attention in the rest, as the official ``TNN``/``LoR_TNN``.
    """

    def __init__(self, cfg: ModelConfig, layout: RelativeLayout, causal: bool) -> None:
        super().__init__()
        d = cfg.dims
        relative = cfg.num_relative_blocks
        self.blocks = nn.ModuleList(
            Block(make_attention(cfg, layout, causal, relative=i < relative, index=i), d.dim, d.mlp_dim, cfg.dropout)
            for i in range(d.depth))
        self.norm = nn.LayerNorm(d.dim)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def reset_submodules(model: nn.Module) -> None:
    """Re-initialise every submodule's parameters and computed buffers as at construction.

    Linear, LayerNorm, Embedding, banks, self-attention (its relative-bias table) and the
    rotary frequencies use their own ``reset_parameters``; PyTorch's defaults are what the
    official code keeps.
    """
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
