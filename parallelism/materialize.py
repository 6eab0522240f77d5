"""Meta-device construction: a model is built on ``meta``, sharded, then materialised shard by shard.

No rank ever holds the full model: after ``apply_fsdp`` (and tp/dispp) every parameter is a
DTensor whose local shard is still on ``meta``; :func:`materialize` allocates only those local
shards (``to_empty``) and fills them with the model's own ``init_weights()``, or
:func:`load_full_state` fills them from a single-process state dict, one tensor at a time.

What random initialisation guarantees: the same seed and the same layout (mesh shape and
world size) give the same weights, and every copy of the same data on different ranks is
identical. It does *not* reproduce the single-process weights of that seed (that would mean
drawing the full tensor somewhere); to start a sharded run from given weights, exactly, use
:func:`load_full_state`.

* On CUDA, DTensor's RNG tracker gives every shard its own offset of the common seed and
  keeps all ranks' generators in step.
* Shards in host memory (a CPU mesh, or CUDA with ``cpu_offload``) are drawn by the CPU
  generator, which DTensor does not track: every rank draws its local shard on its own.
  Seeded alike, all shards of a tensor would hold the *same* numbers (bank rows ``[0, K/2)``
  equal to ``[K/2, K)``), and ranks drawing shards of different sizes would fall out of step.
  So each rank seeds its generator from its mesh coordinates (all but ``dp_replicate``, whose
  replicas draw the same shards), and then every parameter is broadcast, from the first rank,
  along the dims over which it is a copy: dims whose placement is ``Replicate`` and dims its
  DTensor does not span at all (a tensor-parallel-replicated norm that FSDP2 sharded over
  ``dp_shard`` only, say). Plain tensors count as replicated everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

_STREAM_STRIDE = 1_000_003
"""Seed distance between the generator streams of different shard coordinates (CPU)."""


def local_numel(tensor: Tensor) -> int:
    """Elements this rank stores for ``tensor`` (its local shard for a DTensor); works on meta."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


def shard_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank stores; on a meta model, what it would allocate."""
    return sum(local_numel(p) * p.element_size() for p in model.parameters())


def full_bytes(model: nn.Module) -> int:
    """Bytes of the whole (unsharded) model's parameters; works on meta."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _seed_dims(mesh: DeviceMesh) -> list[str]:
    """The mesh dims whose coordinates select different data (all but ``dp_replicate``), ``pp`` left out:
    pipeline stages hold different parameters, so nothing is copied along it."""
    return [name for name in mesh.mesh_dim_names if name not in ("dp_replicate", "pp")]


def _shard_stream(mesh: DeviceMesh | None) -> int:
    """Index of this rank among ranks that draw different numbers (CPU seeding)."""
    if mesh is None:
        return dist.get_rank() if dist.is_initialized() else 0
    index = 0
    for name in _seed_dims(mesh):
        index = index * mesh[name].size() + mesh[name].get_local_rank()
    return index


def _copy_dims(param: Tensor, mesh: DeviceMesh) -> list[str]:
    """The dims of ``mesh`` along which ``param``'s local data is a copy."""
    spec = dict(zip(param.device_mesh.mesh_dim_names, param.placements)) if isinstance(param, DTensor) else {}
    return [name for name in _seed_dims(mesh)
            if mesh[name].size() > 1 and isinstance(spec.get(name, Replicate()), Replicate)]


@torch.no_grad()
def _broadcast_copies(model: nn.Module, mesh: DeviceMesh) -> None:
    """Make every copy of the same data equal to the one on the first rank of its dims
    (through the mesh's device: NCCL cannot send host tensors)."""
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        for name in _copy_dims(param, mesh):
            payload = local if local.device.type == mesh.device_type else local.to(mesh.device_type)
            dist.broadcast(payload, group=mesh[name].get_group(), group_src=0)
            if payload is not local:
                local.copy_(payload)


def _to_empty(model: nn.Module, device: torch.device, cpu_offload: bool) -> None:
    """Allocate local shards (in host memory when FSDP2 offloads them)."""
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module.register_buffer(name, buffer.to(device), persistent=name not in module._non_persistent_buffers_set)


def materialize(model: nn.Module, device: torch.device | str, *, seed: int, mesh: DeviceMesh | None = None,
                cpu_offload: bool = False) -> nn.Module:
    """Allocate this rank's shards of a sharded meta model and initialise them (``init_weights``).

    ``mesh`` is the full device mesh the model was sharded on (``build_mesh``); with
    ``cpu_offload`` the shards stay in host memory (FSDP2 copies them to ``device``).
    """
    device = torch.device(device)
    _to_empty(model, device, cpu_offload)
    in_host_memory = cpu_offload or device.type == "cpu"
    torch.manual_seed(seed + _STREAM_STRIDE * _shard_stream(mesh) if in_host_memory else seed)
    model.init_weights()
    if in_host_memory and mesh is not None:
        _broadcast_copies(model, mesh)
    _buffers_to(model, device)
    return model


def load_full_state(model: nn.Module, device: torch.device | str, state: Mapping[str, Tensor] | None, *,
                    cpu_offload: bool = False, broadcast: bool = True) -> nn.Module:
    """Allocate this rank's shards and fill them from a full (single-process) state dict.

    Only rank 0 needs ``state`` (others pass ``None``): it is broadcast tensor by tensor and
    each rank keeps its shard. With ``broadcast=False`` every rank passes the full state and
    takes the entries of its own parameters (pipeline stages: ranks hold different parameters,
    so a broadcast per rank-0 entry could not pair them). ``init_weights()`` runs first because
    computed (non-persistent) buffers are not in a state dict.
    """
    device = torch.device(device)
    _to_empty(model, device, cpu_offload)
    model.init_weights()
    if broadcast:
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
        set_model_state_dict(model, dict(state) if rank0 and state is not None else {}, options=options)
    else:
        own = model.state_dict().keys()
        set_model_state_dict(model, {k: v for k, v in state.items() if k in own},
                             options=StateDictOptions(full_state_dict=True))
    _buffers_to(model, device)
    return model
