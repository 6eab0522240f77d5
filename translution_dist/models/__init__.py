"""The paper's models: ViT and GPT with Translution, α-Translution or self-attention.

``build_model(cfg)`` works under ``with torch.device("meta")``; a model built there is
materialised with ``model.to_empty(device=…)`` followed by ``model.init_weights()``.
"""

from __future__ import annotations

from torch import nn

from translution_dist.models.config import PRESETS, Dims, ModelConfig
from translution_dist.models.gpt import GPT
from translution_dist.models.vit import ViT


def build_model(cfg: ModelConfig) -> ViT | GPT:
    """The model ``cfg`` describes, on the current default device."""
    return ViT(cfg) if cfg.arch == "vit" else GPT(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["GPT", "PRESETS", "Dims", "ModelConfig", "ViT", "build_model", "count_parameters"]
