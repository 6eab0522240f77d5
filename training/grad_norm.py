"""Global gradient norm and clipping over sharded (DTensor) and plain parameters.

``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms, which fails when DTensors
live on different meshes (FSDP's data mesh, the tensor/displacement meshes). Here the local
squared norms of all gradients sharded alike (same mesh, same sharded mesh dims) are summed
first and completed with one all-reduce per group — not one per parameter, which would cost
a round trip per bank chunk and block. Plain tensors are replicated, so their local norm is
already the global one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate


def global_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    squares: list[torch.Tensor] = []
    groups: dict[tuple, torch.Tensor] = {}
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        if not isinstance(grad, DTensor):
            squares.append(torch.linalg.vector_norm(grad, dtype=torch.float32).square())
            continue
        if any(placement.is_partial() for placement in grad.placements):  # not a sum of shards: complete it alone
            squares.append(torch.linalg.vector_norm(grad, dtype=torch.float32).full_tensor().square())
            continue
        sharded = tuple(placement.is_shard() for placement in grad.placements)
        local = torch.linalg.vector_norm(grad.to_local(), dtype=torch.float32).square()
        key = (grad.device_mesh, sharded)
        groups[key] = groups[key] + local if key in groups else local
    for (mesh, sharded), local in groups.items():
        placements = [Partial() if shard else Replicate() for shard in sharded]
        squares.append(DTensor.from_local(local, mesh, placements).full_tensor())
    if not squares:
        return torch.zeros(())
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float | None,
                   pipeline_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before.

    ``pipeline_group``: the ``pp`` ranks, each holding other parameters (pipeline stages); their
    squared norms are summed, so every stage clips by the whole model's norm.
    """
    parameters = [p for p in parameters if p.grad is not None]
    norm = global_grad_norm(parameters)
    if pipeline_group is not None:
        square = norm.square()
        dist.all_reduce(square, group=pipeline_group)
        norm = square.sqrt()
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in parameters:
            p.grad.mul_(coef.to(p.grad.device))
    return norm
