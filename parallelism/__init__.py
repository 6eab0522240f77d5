"""Sharding applied from outside to a model defined once (torchtitan's way).

``parallelize(model, dims, mesh)`` applies the layout's steps in order: head parallelism
(``tp``), displacement parallelism (``dispp``), then ZeRO-3 (FSDP2) over the data-parallel
dims. DeepSpeed is the other ZeRO-3 engine (``parallelism.deepspeed_zero``), used without
the first two.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallelism.activation_checkpoint import apply_activation_checkpoint
from parallelism.config import ParallelConfig
from parallelism.displacement_parallel import DisplacementBalance, apply_displacement_parallel, displacement_balance
from parallelism.layout import ParallelDims
from parallelism.mesh import build_mesh, data_parallel_coordinates, dp_mesh, finish_collectives, init_distributed
from parallelism.tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh) -> nn.Module:
    """Shard ``model`` in place for ``dims`` and its mesh (:func:`build_mesh`) and return it.

    Run it on a model built on the meta device (then materialise it) or on a model built
    identically on every rank (same seed). The layout is checked against ``model.config`` first.
    """
    sizes = {name: mesh[name].size() for name in dims.sizes}
    if sizes != dims.sizes:
        raise ValueError(f"mesh {sizes} does not match the parallel layout {dims.sizes}; build the mesh from "
                         f"this layout with build_mesh")
    cfg = dims.config
    cfg.check_model(model.config)
    if cfg.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], vocab_parallel=cfg.vocab_parallel)
    if cfg.dispp > 1:
        apply_displacement_parallel(model, mesh)
    if cfg.engine == "fsdp":
        from parallelism.fsdp import apply_fsdp

        apply_fsdp(model, mesh, cfg)
    return model


__all__ = [
    "DisplacementBalance",
    "ParallelConfig",
    "ParallelDims",
    "apply_activation_checkpoint",
    "apply_displacement_parallel",
    "apply_tensor_parallel",
    "build_mesh",
    "data_parallel_coordinates",
    "displacement_balance",
    "dp_mesh",
    "finish_collectives",
    "init_distributed",
    "parallelize",
]
