"""Global gradient norm and clipping over sharded (DTensor) and plain parameters.

``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms, which fails when DTensors
live on different meshes (FSDP's data mesh, the tensor/displacement meshes). Here each
DTensor norm is completed over its own mesh with ``full_tensor()``; plain tensors are
replicated, so their local norm is already the global one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def global_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    total = None
    for p in parameters:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        square = norm.square()
        total = square if total is None else total + square
    if total is None:
        return torch.zeros(())
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = global_grad_norm(parameters)
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in parameters:
            p.grad.mul_(coef.to(p.grad.device))
    return norm
