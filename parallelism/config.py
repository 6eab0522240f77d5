"""The ``parallel:`` section of a run config: how the world of processes is split.

Degrees multiply to the world size: ``pp · dp_replicate · dp_shard · dispp · tp``. ``dp_shard = -1``
takes the rest, filled in by :meth:`ParallelConfig.resolve` once the world size is known; a process resolves
it once, into :class:`parallelism.layout.ParallelDims`.
Model-specific limits (``tp`` must divide the heads, ``dispp`` at most the rows of a bank
chunk) are checked by :meth:`ParallelConfig.check_model`. Errors name the field and the fix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from translution_dist.models.config import BANK_ATTENTIONS, TP_REFUSALS

EngineName = Literal["fsdp", "deepspeed", "none"]
"""The ZeRO-3 engine that shards parameters over the data-parallel ranks (``parallel.engine``)."""
Offload = Literal["none", "cpu", "nvme"]
PipelineScheduleName = Literal["gpipe", "1f1b", "interleaved1f1b", "interleaved_zero_bubble"]
"""``parallel.pp_schedule``: torch.distributed.pipelining's GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble."""
ZERO_BUBBLE_SCHEDULES = ("interleaved_zero_bubble",)
MULTI_STAGE_SCHEDULES = ("interleaved1f1b", "interleaved_zero_bubble")
"""Schedules that run several (virtual) stages per rank."""

DEGREES = ("pp", "dp_replicate", "dp_shard", "dispp", "tp")
"""The parallel degrees in mesh order, outermost first (see :func:`parallelism.mesh.build_mesh`)."""


class ParallelConfig(BaseModel):
    """Degrees of data, head (tensor) and displacement parallelism, and the ZeRO-3 engine."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    engine: EngineName = Field(
        "fsdp", description="fsdp: FSDP2 (ZeRO-3) over the data-parallel ranks, composes with tp and dispp; "
                            "deepspeed: DeepSpeed ZeRO-3/Infinity, data parallelism only; none: no sharding "
                            "and no data-parallel gradient reduction (one process, or tp/dispp only).")
    pp: int = Field(
        1, ge=1, description="Pipeline stages: the blocks are cut into pp consecutive groups (the embedding with "
                             "the first, the head and the loss with the last); outermost mesh dimension.")
    pp_split: list[int] | None = Field(
        None, description="pp>1: the first block of every stage but the first (pp·pp_virtual_stages - 1 "
                          "increasing indices); default: balanced by each block's FLOPs.")
    pp_microbatches: int = Field(
        4, ge=1, description="pp>1: micro-batches the schedule splits each batch into (divides the batch).")
    pp_schedule: PipelineScheduleName = Field(
        "1f1b", description="pp>1: gpipe, 1f1b, interleaved1f1b (pp_virtual_stages stages per rank) or "
                            "interleaved_zero_bubble (engine=none only).")
    pp_virtual_stages: int = Field(
        1, ge=1, description="Stages per pp rank for the interleaved schedules (>= 2 there, 1 otherwise).")
    dp_replicate: int = Field(
        1, ge=1, description="Data-parallel replicas (HSDP's replicate dimension; outside all but pp, spans nodes).")
    dp_shard: int = Field(
        -1, ge=-1, description="Data-parallel ranks that shard parameters (ZeRO-3); -1: the rest of the world.")
    tp: int = Field(
        1, ge=1, description="Head-parallel (tensor-parallel) degree: each rank holds heads/tp whole heads; "
                             "innermost mesh dimension, so keep it inside a node.")
    dispp: int = Field(
        1, ge=1, description="Displacement-parallel degree: each rank holds 1/dispp of every bank chunk's "
                             "displacement rows and the token pairs that use them.")
    vocab_parallel: bool = Field(
        False, description="arch=gpt with tp>1: shard the token embedding and the head over the vocabulary.")
    cpu_offload: bool = Field(False, description="engine=fsdp: keep parameter shards and gradients in host memory.")
    offload_optimizer: Offload = Field(
        "none", description="engine=deepspeed: where optimizer states live (ZeRO-Infinity).")
    offload_param: Offload = Field(
        "none", description="engine=deepspeed: where parameter shards live (ZeRO-Infinity).")
    nvme_path: str | None = Field(None, description="engine=deepspeed: directory for nvme offload.")
    mixed_precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Dtype of gathered parameters: engine=fsdp: FSDP2's MixedPrecisionPolicy (gradients "
                            "reduced in fp32); engine=deepspeed: its bf16/fp16 mode. Master weights stay fp32.")
    reshard_after_forward: bool = Field(
        True, description="engine=fsdp: free gathered parameters after forward (ZeRO-3) or keep them until "
                          "backward (ZeRO-2-like, more memory, fewer all-gathers).")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on CUDA, gloo on CPU.")

    @model_validator(mode="after")
    def _consistent(self) -> ParallelConfig:
        if self.dp_shard == 0:
            raise ValueError("dp_shard must be positive or -1 (the rest of the world); got 0")
        if self.engine == "deepspeed" and (self.tp > 1 or self.dispp > 1 or self.dp_replicate > 1):
            raise ValueError(
                f"engine=deepspeed shards plain tensors over all ranks and cannot hold the DTensor shards of "
                f"tp={self.tp}, dispp={self.dispp} nor replicate (dp_replicate={self.dp_replicate}); use "
                f"engine=fsdp for head/displacement parallelism or HSDP")
        if self.engine != "deepspeed" and (self.offload_optimizer != "none" or self.offload_param != "none"):
            raise ValueError(
                "offload_optimizer/offload_param apply to engine=deepspeed; with engine=fsdp use cpu_offload: true")
        if self.engine != "fsdp" and self.cpu_offload:
            raise ValueError(f"cpu_offload applies to engine=fsdp, not engine={self.engine}; "
                             "for deepspeed use offload_param/offload_optimizer")
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("offload to nvme needs nvme_path: a directory on a local NVMe drive")
        self._check_pipeline()
        if self.engine == "none" and self.mixed_precision != "fp32":
            raise ValueError("mixed_precision sets the ZeRO-3 engine's parameter dtypes and does nothing with "
                             "engine=none; use train.precision for autocast")
        return self

    def _check_pipeline(self) -> None:
        multi = self.pp_schedule in MULTI_STAGE_SCHEDULES
        if multi and self.pp_virtual_stages < 2:
            raise ValueError(f"pp_schedule={self.pp_schedule} runs several stages per rank; set "
                             f"pp_virtual_stages >= 2 or pp_schedule: 1f1b")
        if not multi and self.pp_virtual_stages != 1:
            raise ValueError(f"pp_virtual_stages={self.pp_virtual_stages} needs pp_schedule: interleaved1f1b; "
                             f"pp_schedule={self.pp_schedule} runs one stage per rank")
        if self.pp_schedule in ZERO_BUBBLE_SCHEDULES and self.engine != "none" and self.pp > 1:
            raise ValueError(f"pp_schedule={self.pp_schedule} with engine={self.engine}: zero-bubble schedules "
                             f"split the weight gradient from the input gradient, which FSDP2 reduces wrongly "
                             f"(wrong gradients in trial); use pp_schedule: 1f1b or interleaved1f1b")
        if self.engine == "deepspeed" and self.pp > 1:
            raise ValueError("engine=deepspeed does not compose with pp; use engine=fsdp")
        if self.pp_split is not None:
            stages = self.pp * self.pp_virtual_stages
            if len(self.pp_split) != stages - 1 or any(b <= a for a, b in zip([0, *self.pp_split], self.pp_split)):
                raise ValueError(f"pp_split={self.pp_split} must list the first block of each of the stages after "
                                 f"the first: {stages - 1} increasing indices > 0 for pp·pp_virtual_stages = "
                                 f"{stages} stages; or leave it unset for a FLOPs-balanced split")

    @property
    def num_stages(self) -> int:
        """Pipeline stages in all (``pp · pp_virtual_stages``)."""
        return self.pp * self.pp_virtual_stages

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model between them (``tp · dispp``); they share data."""
        return self.tp * self.dispp

    @property
    def is_resolved(self) -> bool:
        return self.dp_shard != -1

    def resolve(self, world_size: int) -> ParallelConfig:
        """A copy with ``dp_shard = -1`` filled in; checks that the degrees multiply to ``world_size``."""
        fixed = self.pp * self.dp_replicate * self.tp * self.dispp
        degrees = (f"pp={self.pp} · dp_replicate={self.dp_replicate} · dp_shard={self.dp_shard} · "
                   f"dispp={self.dispp} · tp={self.tp}")
        if self.dp_shard == -1:
            if world_size % fixed:
                raise ValueError(
                    f"world size {world_size} is not divisible by pp·dp_replicate·dispp·tp = {fixed} ({degrees}); "
                    f"choose degrees whose product divides {world_size}")
            resolved = self.model_copy(update={"dp_shard": world_size // fixed})
        else:
            resolved = self
            if fixed * self.dp_shard != world_size:
                raise ValueError(
                    f"parallel degrees {degrees} = {fixed * self.dp_shard} do not match the world size "
                    f"{world_size}; make them multiply to {world_size} or set dp_shard: -1")
        data_parallel = resolved.dp_replicate * resolved.dp_shard
        if resolved.engine == "none" and data_parallel > 1:
            raise ValueError(
                f"engine=none does not reduce gradients across the {data_parallel} data-parallel ranks of "
                f"world size {world_size} ({degrees}); use engine=fsdp, or make pp·tp·dispp equal the world size")
        return resolved

    def check_model(self, model: Any) -> None:
        """Check the degrees against a model config (``ModelConfig`` or anything with its fields)."""
        dims = model.dims
        attention = model.attention
        if self.pp > 1:
            if self.num_stages > dims.depth:
                raise ValueError(f"pp·pp_virtual_stages = {self.num_stages} stages exceed depth={dims.depth} "
                                 f"blocks; every stage needs at least one block: lower pp or pp_virtual_stages")
            if self.pp_split is not None and self.pp_split[-1] >= dims.depth:
                raise ValueError(f"pp_split={self.pp_split} cuts at block {self.pp_split[-1]} but depth="
                                 f"{dims.depth}; every stage needs at least one block")
        if self.tp > 1:
            if attention in TP_REFUSALS:
                raise ValueError(f"tp={self.tp} does not apply to attention={attention}: "
                                 f"{TP_REFUSALS[attention]}; set tp: 1 (FSDP2 shards it like any model)")
            if dims.heads % self.tp:
                extra = ("; for attention=alpha the banks [K, heads·r, heads·r] are split by heads on their "
                         "output axis too, so the same rule applies" if attention == "alpha" else "")
                raise ValueError(
                    f"tp={self.tp} must divide heads={dims.heads}: head parallelism gives every rank whole "
                    f"heads{extra}; choose tp among the divisors of {dims.heads}")
            if dims.mlp_dim % self.tp:
                raise ValueError(f"tp={self.tp} must divide mlp_dim={dims.mlp_dim} (the feed-forward is split "
                                 f"by columns); choose another tp or mlp_dim")
            if attention == "self_attention" and model.resolved_position == "relative_bias":
                raise ValueError("tp>1 does not support position=relative_bias (its bias table is indexed "
                                 "inside the layer for all heads); use rope, learned or none, or tp=1")
        if self.vocab_parallel and (model.arch != "gpt" or self.tp == 1):
            raise ValueError("vocab_parallel applies to arch=gpt with tp>1; set vocab_parallel: false")
        if self.dispp > 1:
            if attention not in BANK_ATTENTIONS:
                raise ValueError(f"dispp splits displacement banks and attention={attention} has none; "
                                 "set dispp: 1 or attention: translution/alpha")
            if model.num_relative_blocks == 0:
                raise ValueError("dispp splits displacement banks and relative_blocks=0 leaves none; "
                                 "set dispp: 1 or relative_blocks >= 1")
            k = model.layout().num_displacements
            smallest_chunk = k // model.bank_chunks
            if self.dispp > smallest_chunk:
                raise ValueError(
                    f"dispp={self.dispp} exceeds the {smallest_chunk} displacement rows of the smallest bank "
                    f"chunk (K={k}, bank_chunks={model.bank_chunks}); every rank needs rows of every chunk: "
                    f"lower dispp or bank_chunks")
