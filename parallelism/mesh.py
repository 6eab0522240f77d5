"""Process groups and the device mesh built from the ``parallel`` config.

The mesh has five named dims, outermost first: ``pp``, ``dp_replicate``, ``dp_shard``,
``dispp``, ``tp``. Pipeline stages exchange only activations at their boundary, once per
micro-batch, so ``pp`` is the outermost dim and may span nodes. The innermost dims vary fastest, so a tensor-parallel group is ``tp`` consecutive
ranks and a displacement-parallel group is ``dispp`` ranks ``tp`` apart: both stay inside a
node (their collectives run every layer), while data parallelism, which communicates once
per step, spans nodes. Every dim is kept, size 1 included, so code can always name any of
them (``mesh["tp"]``, ``mesh["dp_replicate", "dp_shard"]``); a size-1 dim costs a trivial
process group and nothing per step.

Ranks that differ only in their ``pp``/``tp``/``dispp`` coordinates hold one copy of the model between
them and must see the same data: data loaders use :func:`data_parallel_coordinates`, and a
loss is averaged over :func:`dp_mesh`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallelism.config import DEGREES, ParallelConfig
from parallelism.layout import DP_DIMS, ParallelDims

DP_FLAT = "dp"
"""Name of the flattened ``(dp_replicate, dp_shard)`` dim, created by :func:`build_mesh`."""


def init_distributed(cfg: ParallelConfig | None = None, timeout: timedelta = timedelta(minutes=10)) -> torch.device:
    """Join the process group torchrun set up (``env://``) and return this rank's device.

    CUDA when available (the device picked from ``LOCAL_RANK``) with NCCL, else the CPU with
    gloo; ``cfg.backend`` may force one. A collective slower than ``timeout`` fails the job
    instead of hanging it.
    """
    backend = cfg.backend if cfg is not None else "auto"
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("parallel.backend=nccl needs CUDA, and none is available; use backend: auto or gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout,
                                device_id=device if use_cuda else None)
    return device


def finish_collectives() -> None:
    """Wait, on every rank, for the collectives still in flight on every process group.

    Call it after the last step, before the process exits. A gloo worker thread that finishes
    a collective nobody waited for (DeepSpeed's prefetching all-gathers) frees its tensors,
    which takes the GIL; once the interpreter is finalizing, that aborts the process
    ("terminate called without an active exception", pytorch/pytorch#117762), and
    ``destroy_process_group`` does not join those threads while other objects still hold the
    groups. A barrier per group returns only when all earlier work on it is done. The groups are
    created in the same order everywhere, so the ranks meet at each barrier in turn.
    """
    if not dist.is_initialized():
        return
    for group in list(dist.distributed_c10d._world.pg_map):  # every group, also those libraries made
        dist.barrier(group=group)


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The ``(pp, dp_replicate, dp_shard, dispp, tp)`` mesh of a resolved layout.

    Also creates the flattened ``dp`` dim (see :func:`dp_mesh`); every rank must call this.
    """
    mesh = init_device_mesh(device_type, tuple(dims.sizes[d] for d in DEGREES), mesh_dim_names=DEGREES)
    mesh[DP_DIMS]._flatten(DP_FLAT)
    return mesh


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh of this rank's data-parallel peers (its ``tp``/``dispp`` coordinates fixed).

    Average a loss or a metric over it; the ``tp``/``dispp`` peers already hold the same value.
    """
    return mesh[DP_DIMS]._flatten(DP_FLAT)


def data_parallel_coordinates(mesh: DeviceMesh | None) -> tuple[int, int]:
    """``(rank, size)`` among the data-parallel ranks: what a data loader shards by."""
    if mesh is None:
        return 0, 1
    flat = dp_mesh(mesh)
    return flat.get_local_rank(), flat.size()
