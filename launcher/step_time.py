"""Seconds per optimizer step of a layout: compute, exposed communication, offload, optimizer.

The planner chooses among layouts that fit by this estimate. Per rank and step:

* **compute** — the executed FLOPs of the rank's samples (:mod:`translution_dist.models.flops`:
  per-pair work divided by ``tp`` and shared by ``dispp`` as the busiest rank's bank rows,
  dense work divided by ``tp``, the root repeated) at the
  device's peak times an efficiency: ``kernel_efficiency`` for the pair kernels' terms,
  ``matmul_efficiency`` for the rest (``cluster.hardware``);
* **collectives** — each as ``calls × ring steps × latency + bytes / bandwidth`` on the link it
  crosses (:mod:`launcher.step_cost` records group, link, bytes and calls);
* **overlap** — ZeRO-3's all-gathers and reduce-scatters (and HSDP's all-reduce) are prefetched
  unit by unit, so they hide behind compute; so do the offload copies that travel with them
  (FSDP2 ``cpu_offload`` copies each shard in before its all-gather and the gradient out after
  its reduce-scatter; DeepSpeed's offloaded parameters). One unit's transfers cannot hide (the
  first gather of the forward, the last reduction of the backward), and what exceeds the
  compute is exposed. CPU processes get no overlap: gloo's copies and reductions run on the
  cores that compute (measured: ``docs/scale.md``). Head- and displacement-parallel all-reduces sit on the critical path
  (the next op needs their result), as do DeepSpeed's offloaded-optimizer copies and NVMe
  state traffic, and the optimizer step;
* **optimizer** — AdamW over the rank's parameters: on the host at ``cpu_adam_params_per_s``
  (offloaded states, and every state of a CPU process), on a GPU memory-bound, 28 bytes a
  parameter (read parameter, gradient and both moments; write parameter and moments).

MFU counts the *model* FLOPs (no recomputation) of the global batch over the step time and
the peak of every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.step_cost import Collective, StepCost
from parallelism.config import ParallelConfig
from parallelism.displacement_parallel import local_rows
from training.config import Config
from training.hardware import Hardware
from translution_dist.models import ModelConfig
from translution_dist.models.attention import chunk_bounds
from translution_dist.models.flops import FlopTerm, flop_terms, model_flops_per_sample, tokens_per_sample

ADAM_BYTES_PER_PARAM = 28
"""A fused AdamW step on the device: reads fp32 parameter, gradient, m, v (16 B); writes parameter, m, v (12 B)."""


@dataclass(frozen=True)
class StepTime:
    """One rank's step, in seconds, by term; and what the step achieves."""

    compute_s: float
    hidden_comm_s: float  # ZeRO-3/HSDP collectives, before overlap
    critical_comm_s: float  # tp/dispp all-reduces
    pipelined_offload_s: float  # offload copies that travel with the ZeRO-3 units, before overlap
    serial_offload_s: float  # copies and NVMe traffic that wait for the optimizer
    unhidden_s: float  # one unit's transfers that prefetching cannot hide
    optimizer_s: float
    tokens: int  # per step, all ranks
    model_flops: float  # per step, all ranks
    world: int
    peak_flops: float
    overlap: bool = True  # transfers proceed beside compute (GPUs); not for CPU processes

    @property
    def _hidable_s(self) -> float:
        """Compute that prefetched transfers can hide behind."""
        return self.compute_s if self.overlap else 0.0

    @property
    def exposed_comm_s(self) -> float:
        """Collective time the step waits for."""
        return self.critical_comm_s + max(0.0, self.hidden_comm_s - self._hidable_s) + self.unhidden_s

    @property
    def offload_s(self) -> float:
        """Offload time the step waits for (after the collectives it travels with)."""
        pipelined = max(0.0, self.hidden_comm_s + self.pipelined_offload_s - max(self._hidable_s, self.hidden_comm_s))
        return pipelined + self.serial_offload_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.offload_s + self.optimizer_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs per second over the peak of all ranks (a fraction)."""
        return self.model_flops / (self.step_s * self.world * self.peak_flops)


def displacement_share(model: ModelConfig, dispp: int) -> float:
    """The busiest ``dispp`` rank's share of the bank rows: the first rank of every chunk gets
    ``ceil(rows/dispp)`` (``torch.chunk``), and the storage order makes pairs proportional to rows."""
    k = model.layout().num_displacements
    first = sum(b - a for a, b in (local_rows(*chunk, dispp, 0) for chunk in chunk_bounds(k, model.bank_chunks)))
    return first / k


def _share(term: FlopTerm, model: ModelConfig, layout: ParallelConfig) -> float:
    if term.split == "pairs":
        return displacement_share(model, layout.dispp) / layout.tp
    if term.split == "heads" or (term.name == "head" and layout.vocab_parallel):
        return 1 / layout.tp
    return 1.0


def compute_seconds(cfg: Config, layout: ParallelConfig, hw: Hardware) -> float:
    """Executed FLOPs of one rank's micro-batches, each term at its rate."""
    samples = cfg.train.micro_batch_size * cfg.train.grad_accum
    total = 0.0
    for term in flop_terms(cfg.model):
        efficiency = hw.kernel_efficiency if term.split == "pairs" else hw.matmul_efficiency
        total += term.executed * _share(term, cfg.model, layout) / (hw.peak_flops * efficiency)
    return samples * total


def collective_seconds(c: Collective, hw: Hardware) -> float:
    """``calls × ring steps × latency + bytes / bandwidth`` on the link ``c`` crosses; all-gathers and
    reduce-scatters at their measured fraction of the all-reduce's bandwidth (gloo emulates them)."""
    latency, bandwidth = ((hw.inter_node_latency, hw.inter_node_bandwidth) if c.inter_node
                          else (hw.intra_node_latency, hw.intra_node_bandwidth))
    efficiency = {"all_gather": hw.all_gather_efficiency, "reduce_scatter": hw.reduce_scatter_efficiency}.get(c.kind, 1.0)
    return c.calls * c.ring_steps * latency + c.bytes / (bandwidth * efficiency)


def step_time(cfg: Config, layout: ParallelConfig, cost: StepCost, params_per_rank: int, world: int,
              on_gpu: bool, hw: Hardware) -> StepTime:
    """The step of ``cfg`` under ``layout`` (``cost``: its data movement; ``params_per_rank``: the
    elements of the rank's optimizer step)."""
    compute = compute_seconds(cfg, layout, hw)
    hidden = [c for c in cost.collectives if c.hidden]
    hidden_s = sum(collective_seconds(c, hw) for c in hidden)
    critical_s = sum(collective_seconds(c, hw) for c in cost.collectives if not c.hidden)
    pipelined = ((cost.pcie - cost.serial_pcie) / hw.pcie_bandwidth + (cost.nvme - cost.serial_nvme) / hw.nvme_bandwidth)
    serial = cost.serial_pcie / hw.pcie_bandwidth + cost.serial_nvme / hw.nvme_bandwidth
    calls = sum(c.calls for c in hidden)
    # One gather and one reduction cannot hide; without overlap nothing does (and nothing is counted twice).
    unhidden = 2 * (hidden_s + pipelined) / calls if calls and on_gpu else 0.0
    device_params = params_per_rank - cost.cpu_updates
    optimizer = cost.cpu_updates / hw.cpu_adam_params_per_s + (
        device_params * ADAM_BYTES_PER_PARAM / hw.memory_bandwidth if on_gpu
        else device_params / hw.cpu_adam_params_per_s)
    samples = cfg.train.micro_batch_size * cfg.train.grad_accum * layout.dp_replicate * layout.dp_shard
    return StepTime(compute, hidden_s, critical_s, pipelined, serial, unhidden, optimizer,
                    samples * tokens_per_sample(cfg.model), samples * model_flops_per_sample(cfg.model), world,
                    hw.peak_flops, overlap=on_gpu)
