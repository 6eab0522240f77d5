"""Token mixers of the convolution–attention family, beside Translution (issue 14).

Each is a pre-norm layer ``[B, N, C] → [B, N, C]`` (the residual branch), built by
:func:`make_mixer` from a :class:`~translution_dist.models.config.ModelConfig` whose
``attention`` names it. One file per mixer; the choices a paper leaves open are stated in
its module docstring and in ``docs/models.md``.
"""

from __future__ import annotations

from torch import nn

from translution_dist.models.config import ModelConfig
from translution_dist.models.mixers.acmix import ACmix
from translution_dist.models.mixers.mixformer import MixFormerMixer
from translution_dist.models.mixers.shift_structure import ShiftStructureAttention
from translution_dist.models.mixers.uniformer import UniFormerMixer
from translution_dist.ops import RelativeLayout


def make_mixer(cfg: ModelConfig, layout: RelativeLayout, causal: bool, index: int) -> nn.Module:
    """The mixer ``cfg.attention`` names for block ``index`` (the config validator has checked that it suits
    ``cfg.arch``)."""
    d = cfg.dims
    if cfg.attention == "acmix":
        return ACmix(layout, d.dim, d.heads, d.dim_head, cfg.mixer_kernel, cfg.dropout)
    if cfg.attention == "shift_structure":
        return ShiftStructureAttention(layout, d.dim, d.heads, d.dim_head, causal, cfg.dropout)
    if cfg.attention == "uniformer":
        return UniFormerMixer(layout, d.dim, d.heads, d.dim_head, index < cfg.num_local_blocks, cfg.mixer_kernel,
                              cfg.dropout)
    if cfg.attention == "mixformer":
        return MixFormerMixer(layout, d.dim, d.heads, d.dim_head, cfg.mixer_kernel, cfg.dropout)
    raise ValueError(f"attention={cfg.attention!r} is not a mixer of translution_dist.models.mixers")


__all__ = ["ACmix", "MixFormerMixer", "ShiftStructureAttention", "UniFormerMixer", "make_mixer"]
