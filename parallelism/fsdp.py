"""ZeRO-3 with PyTorch FSDP2: one ``fully_shard`` unit per bank chunk, per block, then the root.

A bank chunk's forward is the only place its weights are used (see
``translution_dist.models.attention``), so making every chunk its own unit bounds the bank
memory a rank gathers at once to one chunk, whatever the layer's size. Blocks are the second
level (their norms, plain projections and feed-forward), the root holds the rest (embeddings,
head, final norms).

Sharding is over ``dp_shard`` and replication over ``dp_replicate`` (HSDP when both are > 1).
Tensor- and displacement-parallel parameters are DTensors on the ``tp``/``dispp`` dims of the
same mesh; FSDP2 composes with them by sharding their local tensors once more on dim 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from translution_dist.models.attention import bank_chunk_modules
from translution_dist.models.blocks import Block

if TYPE_CHECKING:
    from parallelism.config import ParallelConfig

"""Modules whose parameters are bank rows: each is one gather unit."""

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDPSettings(Protocol):
    """The fields of :class:`ParallelConfig` this module reads."""

    cpu_offload: bool
    mixed_precision: str
    reshard_after_forward: bool


def data_parallel_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The mesh FSDP2 shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP.

    FSDP2 shards over a 1-D mesh and, given a 2-D one, replicates over dim 0 and shards over
    dim 1 (with ``dp_shard = 1`` that is plain replication). ``None`` (no mesh) lets FSDP2
    shard over the whole default process group.
    """
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if not {"dp_replicate", "dp_shard"} <= set(names):
        raise ValueError(f"mesh dims {names} lack dp_replicate/dp_shard; build it with parallelism.build_mesh")
    return mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]


def mixed_precision_policy(mixed_precision: str, *, root: bool = False) -> MixedPrecisionPolicy:
    """Unsharded parameters (compute and all-gather) in bf16/fp16, gradients reduced in fp32.

    The root casts its outputs back to fp32, so that the loss is computed in full precision.
    """
    param_dtype = _LOW_PRECISION.get(mixed_precision)
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                output_dtype=torch.float32 if root else None)


def offload_policy(cpu_offload: bool) -> OffloadPolicy:
    """CPU offload of sharded parameters, gradients and optimizer state.

    Pinned memory needs an accelerator (``CPUOffloadPolicy()`` fails without one), so it is
    pinned only when CUDA is there.
    """
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()


def apply_fsdp(model: nn.Module, mesh: DeviceMesh | None, cfg: ParallelConfig | FSDPSettings) -> nn.Module:
    """Shard ``model`` in place: every bank chunk, then every block, then the root.

    Works on a model still on the meta device (only shard metadata is created); materialise
    it afterwards with :func:`parallelism.materialize.materialize`.

    A bank chunk never prefetches in backward: FSDP2's default would all-gather the next
    chunk while this one computes, two chunks at once. Blocks keep the default prefetch (a
    block prefetches its last chunk while its feed-forward runs backward: one chunk). The root
    stays gathered from forward to backward (FSDP2's default for it).
    ``reshard_after_forward=False`` keeps every unit gathered from forward to backward and so
    gives up the one-chunk bound.
    """
    mesh = data_parallel_mesh(mesh)
    offload = offload_policy(cfg.cpu_offload)
    policy = mixed_precision_policy(cfg.mixed_precision)
    chunks = bank_chunk_modules(model)
    for unit in [*chunks, *(m for m in model.modules() if isinstance(m, Block))]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision_policy(cfg.mixed_precision, root=True),
                offload_policy=offload, reshard_after_forward=False)
    for chunk in chunks:
        # An explicit prefetch target replaces FSDP2's implicit one (the next chunk). The root
        # is gathered throughout backward, so prefetching it does nothing.
        chunk.set_modules_to_backward_prefetch([model])
    return model
