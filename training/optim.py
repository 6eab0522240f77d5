"""The optimizer and the learning-rate schedule every backend uses: AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from training.config import Config, OptimSection


def build_adamw(params: list, optim: OptimSection, foreach: bool = True) -> torch.optim.AdamW:
    """AdamW with the config's settings; its param group is also what a DeepSpeed checkpoint records."""
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                             foreach=foreach)


def adamw_for(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW over the model's parameters in one group, as every backend's checkpoint records them.

    tp/dispp without FSDP leave some parameters plain next to the DTensors; the foreach kernels
    cannot mix the two, so such a model steps parameter by parameter (the same arithmetic).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    mixed = len({isinstance(p, DTensor) for p in params}) > 1
    return build_adamw(params, optim, foreach=not mixed)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``optim.lr`` over ``optim.warmup_steps``, then cosine decay to ``optim.min_lr`` at ``train.steps``."""
    optim, total_steps = cfg.optim, cfg.train.steps
    floor = optim.min_lr / optim.lr

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
