"""What a layout costs per optimizer step in data movement, for choosing among layouts that fit.

Memory decides whether a layout *can* run; among those that can, the planner prefers the one
that moves the least data per step, in estimated seconds, so that offload traffic (PCIe,
NVMe), the CPU optimizer step of offloaded states, and collectives inside a node (NVLink) and
across nodes (the network) are weighed on one scale. Bandwidths are nominal per-GPU figures
of a current GPU node (constants below); only their ratios matter for the ranking.

Per rank and step (``ga`` micro-batches, ring collectives: a group of ``k`` moves ``(k-1)/k``
of the data):

* ZeRO-3: two all-gathers of the compute-dtype parameters per micro-batch (forward and
  backward), one reduce-scatter of fp32 gradients; HSDP adds an all-reduce of the gradient
  shard over the replicas. DeepSpeed shards over all ranks.
* Head parallelism: four all-reduces of a block's ``B·N·C`` activations per layer and
  micro-batch; displacement parallelism: one of the partial outputs ``B·N·C'/tp`` (forward),
  one of the bank input's gradient ``B·N·C`` (backward) and three of softmax statistics
  ``B·N·h/tp`` (row maxima and sums, then ``Σ_j a_ij·dA_ij``) — measured equal in
  ``benchmarks/bench_parallel.py``.
* FSDP2 ``cpu_offload``: the fp32 shard is copied to the GPU for every all-gather and the
  gradient shard back once; the host runs AdamW over the shard.
* DeepSpeed: offloaded parameters are copied in for every gather; an offloaded optimizer
  gets the fp32 gradient partition every micro-batch and returns the updated parameters; NVMe
  offload reads and writes the states (or parameters) through the drives.

A collective crosses nodes when its group spans more ranks than a node has (mesh dims are
laid out innermost-fastest, see ``parallelism.mesh``). Every collective is also recorded with
its group, link, calls per step and whether prefetching can hide it behind compute
(ZeRO-3's gathers and reductions) or it sits on the critical path (head and displacement
parallelism's all-reduces): :mod:`launcher.step_time` turns them into seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from launcher.memory_model import FP32, model_census
from launcher.shard_model import padded_model_parallel_numel, padded_shard_numel
from parallelism.config import ParallelConfig
from training.config import Config

PCIE_BYTES_PER_S = 25e9
"""Host ↔ GPU, per GPU (PCIe 5 ×16, effective)."""
NVLINK_BYTES_PER_S = 150e9
"""GPU ↔ GPU inside a node, per GPU."""
NETWORK_BYTES_PER_S = 25e9
"""Across nodes, per GPU (one 200 Gb/s NIC per GPU)."""
NVME_BYTES_PER_S = 3e9
"""NVMe, per GPU (a node's drives shared by its GPUs)."""
CPU_ADAM_PARAMS_PER_S = 2e8
"""AdamW updates per second of one process's offloaded states on the host."""
TP_ALL_REDUCES_PER_LAYER = 4
"""Head parallelism: attention and MLP outputs forward, their inputs' gradients backward."""
DISPP_ALL_REDUCES_PER_LAYER = 6
"""Displacement parallelism: row maxima, exp-sums and partial outputs forward; Σ a·dA, the bank
input's gradient (and a scalar) backward — counted in ``benchmarks/bench_parallel.py`` (12 for 2 blocks)."""

Kind = Literal["all_gather", "reduce_scatter", "all_reduce"]


@dataclass(frozen=True)
class Collective:
    """One kind of collective of a step on one rank."""

    name: str
    kind: Kind
    group: int  # ranks in the group
    inter_node: bool  # the group spans nodes
    bytes: float  # what the rank sends per step (ring: (k-1)/k of the payload, twice for an all-reduce)
    calls: int  # collective calls per step
    hidden: bool  # prefetching can overlap it with compute (ZeRO-3); else on the critical path

    @property
    def ring_steps(self) -> int:
        """Latency-bound steps of one call of a ring algorithm."""
        return (2 if self.kind == "all_reduce" else 1) * (self.group - 1)


@dataclass(frozen=True)
class StepCost:
    """Bytes one rank moves per optimizer step, by path, and the estimated time."""

    inter_node: int
    intra_node: int
    pcie: int
    nvme: int
    cpu_updates: int  # parameters whose AdamW update runs on the host
    collectives: tuple[Collective, ...] = field(default=())
    serial_pcie: int = 0  # of ``pcie``: copies that wait for the optimizer (DeepSpeed's offloaded optimizer)
    serial_nvme: int = 0  # of ``nvme``: the offloaded optimizer's state traffic

    @property
    def seconds(self) -> float:
        """Data movement at the nominal bandwidths, all of it serial (no compute, no overlap)."""
        return (self.inter_node / NETWORK_BYTES_PER_S + self.intra_node / NVLINK_BYTES_PER_S
                + self.pcie / PCIE_BYTES_PER_S + self.nvme / NVME_BYTES_PER_S
                + self.cpu_updates / CPU_ADAM_PARAMS_PER_S)


def step_cost(cfg: Config, layout: ParallelConfig, procs_per_node: int) -> StepCost:
    """The data movement of one optimizer step of ``cfg`` under ``layout`` (see the module docstring)."""
    model, train = cfg.model, cfg.train
    ga = train.grad_accum
    recorded: list[Collective] = []

    def collective(name: str, kind: Kind, nbytes: float, group: int, span: int, calls: int, hidden: bool) -> None:
        if group > 1:
            recorded.append(Collective(name, kind, group, span > procs_per_node, nbytes, calls, hidden))

    census = model_census(model, layout.vocab_parallel)
    params = census.params
    units = len(census.units())
    low = layout.mixed_precision in ("bf16", "fp16") or (
        layout.engine == "deepspeed" and train.precision in ("bf16", "fp16"))
    compute = 2 if low else FP32
    mp = layout.tp * layout.dispp
    pcie = nvme = updates = serial_pcie = serial_nvme = 0.0
    if layout.engine == "fsdp":
        numel = sum(padded_model_parallel_numel(p, layout) for p in params)
        ds, rep = layout.dp_shard, layout.dp_replicate
        share = (ds - 1) / ds
        collective("ZeRO-3 all-gather", "all_gather", 2 * ga * compute * numel * share, ds, ds * mp, 2 * ga * units,
                   True)
        collective("ZeRO-3 reduce-scatter", "reduce_scatter", FP32 * numel * share, ds, ds * mp, units, True)
        collective("HSDP all-reduce", "all_reduce", 2 * FP32 * numel / ds * (rep - 1) / rep, rep, ds * mp * rep,
                   units, True)
        if layout.cpu_offload:
            shard = sum(padded_shard_numel(p, layout) for p in params)
            pcie, updates = (2 * ga + 1) * shard * FP32, shard
    elif layout.engine == "deepspeed":
        numel = sum(p.numel for p in params)
        world = layout.dp_shard * layout.dp_replicate
        share = (world - 1) / world
        collective("ZeRO-3 all-gather", "all_gather", 2 * ga * compute * numel * share, world, world,
                   2 * ga * units, True)
        collective("ZeRO-3 reduce-scatter", "reduce_scatter", FP32 * numel * share, world, world, units, True)
        partition = sum(padded_shard_numel(p, layout) for p in params)
        gathers = 2 * ga * partition * compute
        if layout.offload_param == "cpu":
            pcie += gathers
        elif layout.offload_param == "nvme":
            nvme += gathers
        if layout.offload_optimizer != "none":
            serial_pcie = ga * partition * FP32 + partition * compute
            pcie += serial_pcie
            updates = partition
        if layout.offload_optimizer == "nvme":
            serial_nvme = 2 * 3 * FP32 * partition  # read and write the master copy and both moments
            nvme += serial_nvme
    d = model.dims
    tokens = train.micro_batch_size * model.layout().max_tokens * ga
    act = 2 if train.precision != "fp32" or low else FP32
    if layout.tp > 1:
        collective("tp all-reduce", "all_reduce",
                   TP_ALL_REDUCES_PER_LAYER * d.depth * tokens * d.dim * act * 2 * (layout.tp - 1) / layout.tp,
                   layout.tp, layout.tp, TP_ALL_REDUCES_PER_LAYER * d.depth * ga, False)
    if layout.dispp > 1:
        width = d.dim + d.heads * d.dim_head // layout.tp + 3 * d.heads // layout.tp
        collective("dispp all-reduce", "all_reduce",
                   d.depth * tokens * width * FP32 * 2 * (layout.dispp - 1) / layout.dispp, layout.dispp, mp,
                   DISPP_ALL_REDUCES_PER_LAYER * d.depth * ga, False)
    inter = sum(c.bytes for c in recorded if c.inter_node)
    intra = sum(c.bytes for c in recorded if not c.inter_node)
    return StepCost(int(inter), int(intra), int(pcie), int(nvme), int(updates), tuple(recorded),
                    int(serial_pcie), int(serial_nvme))
