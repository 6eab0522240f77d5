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
laid out innermost-fastest, see ``parallelism.mesh``).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class StepCost:
    """Bytes one rank moves per optimizer step, by path, and the estimated time."""

    inter_node: int
    intra_node: int
    pcie: int
    nvme: int
    cpu_updates: int  # parameters whose AdamW update runs on the host

    @property
    def seconds(self) -> float:
        return (self.inter_node / NETWORK_BYTES_PER_S + self.intra_node / NVLINK_BYTES_PER_S
                + self.pcie / PCIE_BYTES_PER_S + self.nvme / NVME_BYTES_PER_S
                + self.cpu_updates / CPU_ADAM_PARAMS_PER_S)


def step_cost(cfg: Config, layout: ParallelConfig, procs_per_node: int) -> StepCost:
    """The data movement of one optimizer step of ``cfg`` under ``layout`` (see the module docstring)."""
    model, train = cfg.model, cfg.train
    ga = train.grad_accum
    paths = {"inter": 0.0, "intra": 0.0}

    def collective(nbytes: float, span: int) -> None:
        paths["inter" if span > procs_per_node else "intra"] += nbytes

    params = model_census(model, layout.vocab_parallel).params
    low = layout.mixed_precision in ("bf16", "fp16") or (
        layout.engine == "deepspeed" and train.precision in ("bf16", "fp16"))
    compute = 2 if low else FP32
    mp = layout.tp * layout.dispp
    pcie = nvme = updates = 0.0
    if layout.engine == "fsdp":
        numel = sum(padded_model_parallel_numel(p, layout) for p in params)
        ds, rep = layout.dp_shard, layout.dp_replicate
        collective((2 * ga * compute + FP32) * numel * (ds - 1) / ds, ds * mp)
        collective(2 * FP32 * numel / ds * (rep - 1) / rep, ds * mp * rep)
        if layout.cpu_offload:
            shard = sum(padded_shard_numel(p, layout) for p in params)
            pcie, updates = (2 * ga + 1) * shard * FP32, shard
    elif layout.engine == "deepspeed":
        numel = sum(p.numel for p in params)
        world = layout.dp_shard * layout.dp_replicate
        collective((2 * ga * compute + FP32) * numel * (world - 1) / world, world)
        partition = sum(padded_shard_numel(p, layout) for p in params)
        gathers = 2 * ga * partition * compute
        if layout.offload_param == "cpu":
            pcie += gathers
        elif layout.offload_param == "nvme":
            nvme += gathers
        if layout.offload_optimizer != "none":
            pcie += ga * partition * FP32 + partition * compute
            updates = partition
        if layout.offload_optimizer == "nvme":
            nvme += 2 * 3 * FP32 * partition  # read and write the master copy and both moments
    d = model.dims
    tokens = train.micro_batch_size * model.layout().max_tokens * ga
    act = 2 if train.precision != "fp32" or low else FP32
    if layout.tp > 1:
        collective(4 * d.depth * tokens * d.dim * act * 2 * (layout.tp - 1) / layout.tp, layout.tp)
    if layout.dispp > 1:
        width = d.dim + d.heads * d.dim_head // layout.tp + 3 * d.heads // layout.tp
        collective(d.depth * tokens * width * FP32 * 2 * (layout.dispp - 1) / layout.dispp, mp)
    return StepCost(int(paths["inter"]), int(paths["intra"]), int(pcie), int(nvme), int(updates))
