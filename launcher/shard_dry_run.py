"""A dry run of the real sharding code for a whole cluster, in one process, without GPUs.

For each rank asked for, it joins PyTorch's fake process group (``backend="fake"`` with
``FakeStore``: collectives return at once, nothing is sent) as that rank of the full world
size, builds the model on the meta device, and applies ``parallelism.parallelize`` on the
mesh of ``parallelism.build_mesh`` exactly as a training process would (head parallelism,
displacement parallelism, FSDP2). No parameter memory is allocated; the shards' shapes and
FSDP2's padded shard sizes are what the rank would allocate. :func:`verify` compares them with
the memory model: every local shape with :func:`launcher.shard_model.local_shape`, and the
bytes FSDP2 allocates with the plan's parameter bytes per rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from launcher.memory_model import MemoryEstimate, fmt_bytes, model_census
from launcher.shard_model import Coordinates, local_shape
from parallelism import ParallelDims, build_mesh, parallelize
from parallelism.config import ParallelConfig
from translution_dist.models import ModelConfig, build_model


@dataclass(frozen=True)
class RankShards:
    """What one rank holds after the real sharding code ran."""

    rank: int
    coordinates: Coordinates
    local_bytes: int  # bytes of the local shards (DTensor.to_local())
    allocated_bytes: int  # what the rank allocates: FSDP2 pads every shard to the first rank's size
    bank_shard: tuple[int, ...]  # local shape of the first bank parameter (empty without banks)
    mismatches: tuple[str, ...] = field(default=())  # parameters whose local shape differs from the model's


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _allocated_bytes(model: nn.Module) -> int:
    """Bytes of FSDP2's padded sharded parameters (every unit's ``padded_sharded_param_size``)."""
    from torch.distributed.fsdp import FSDPModule

    total = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group  # FSDP2's private state; read only
        for fsdp_param in group.fsdp_params if group is not None else ():
            total += math.prod(fsdp_param.padded_sharded_param_size) * fsdp_param.sharded_param.element_size()
    return total


def shard_rank(model_config: ModelConfig, layout: ParallelConfig, rank: int) -> RankShards:
    """Shard the meta model as ``rank`` of ``layout``'s world and record its local shards."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = layout.dp_replicate * layout.dp_shard * layout.dispp * layout.tp
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; run the dry run in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        dims = ParallelDims.resolve(layout, world)
        mesh = build_mesh(dims, "cpu")
        with torch.device("meta"):
            model = build_model(model_config)
        parallelize(model, dims, mesh)
        census = {p.name: p for p in model_census(model_config, layout.vocab_parallel).params}
        at = Coordinates.of(rank, layout)
        local_bytes = 0
        bank: tuple[int, ...] = ()
        mismatches = []
        for name, p in model.named_parameters():
            local = _local(p)
            local_bytes += local.numel() * local.element_size()
            if not bank and census[name].role == "bank":
                bank = tuple(local.shape)
            expected = local_shape(census[name], layout, at)
            if tuple(local.shape) != expected:
                mismatches.append(f"{name}: local {tuple(local.shape)}, model {expected}")
        allocated = _allocated_bytes(model) if layout.engine == "fsdp" else local_bytes
        return RankShards(rank, at, local_bytes, allocated, bank, tuple(mismatches))
    finally:
        dist.destroy_process_group()


def default_ranks(world: int, procs_per_node: int) -> list[int]:
    """The first and last rank, and one rank per node at a different local position (so that
    every tensor-/displacement-parallel coordinate appears)."""
    nodes = world // procs_per_node
    picked = {0, world - 1, *(node * procs_per_node + node % procs_per_node for node in range(nodes))}
    return sorted(picked)


@dataclass(frozen=True)
class Verification:
    """Every checked rank's shards against the plan's parameter bytes per rank."""

    layout: ParallelConfig
    planned_bytes: int  # the plan's fp32 parameter bytes per rank (largest rank, padded)
    ranks: tuple[RankShards, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(not r.mismatches and r.allocated_bytes <= self.planned_bytes for r in self.ranks) and any(
            r.allocated_bytes == self.planned_bytes for r in self.ranks)

    def describe(self) -> str:
        world = self.layout.dp_replicate * self.layout.dp_shard * self.layout.dispp * self.layout.tp
        lines = [f"shard dry run ({len(self.ranks)} ranks of {world}, fake process group, {self.seconds:.0f} s): "
                 f"plan {fmt_bytes(self.planned_bytes)} ({self.planned_bytes:,} B) of fp32 parameters per rank",
                 f"{'rank':>5} {'(rep, shard, dispp, tp)':>24} {'local shards':>16} {'allocated':>16}  "
                 f"first bank's shard"]
        for r in self.ranks:
            c = r.coordinates
            coordinates = str((c.dp_replicate, c.dp_shard, c.dispp, c.tp))
            lines.append(f"{r.rank:>5} {coordinates:>24} {r.local_bytes:>16,} {r.allocated_bytes:>16,}  "
                         f"{list(r.bank_shard)}")
            lines += [f"      shape differs: {m}" for m in r.mismatches[:5]]
        lines.append("every shard shape matches the plan; allocated bytes match it" if self.ok
                     else "MISMATCH between the real shards and the plan (see above)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"planned_bytes": self.planned_bytes, "ok": self.ok, "seconds": self.seconds,
                "ranks": [asdict(r) for r in self.ranks]}


def verify(model_config: ModelConfig, layout: ParallelConfig, ranks: list[int],
           estimate: MemoryEstimate) -> Verification:
    """Shard ``ranks`` with the real code and compare with ``estimate`` (the plan for ``layout``)."""
    start = time.perf_counter()
    shards = tuple(shard_rank(model_config, layout, rank) for rank in ranks)
    return Verification(layout, estimate.param_bytes_per_rank, shards, time.perf_counter() - start)
