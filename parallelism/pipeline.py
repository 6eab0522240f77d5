"""Pipeline parallelism: the model defined once, cut into stages of consecutive blocks from outside.

As torchtitan's ``pipeline_llm``: every ``pp`` rank takes a copy of the whole model (built on
meta, so the copy is free), deletes the blocks its stage does not own and the parts of the
embedding and the readout (head, final norms) that belong to the first and the last stage,
and runs :class:`torch.distributed.pipelining.PipelineStage` on what is left. The kept blocks
keep their indices (``encoder.blocks.5…``), so a stage's parameter names are those of the
whole model: checkpoints have one layout whatever ``pp`` and the split.

A stage runs ``embed`` (first stage), its blocks, then the encoder's norm and ``readout``
(last stage); the models expose ``embed``/``readout`` for that and know nothing else of
pipelining. ``tp``, ``dispp`` and FSDP2 are applied to each stage as to a whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule

from parallelism.config import MULTI_STAGE_SCHEDULES, ParallelConfig
from translution_dist.models.flops import executed_flops_per_sample

READOUT_PARTS = ("final_norm", "head")
"""Top-level parts of a model that only the last stage holds; every other part besides the encoder
(embeddings, class token, position table) belongs to the first stage."""

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B,
              "interleaved_zero_bubble": ScheduleInterleavedZeroBubble}


def block_costs(model_config) -> list[float]:
    """Executed FLOPs of each block for one sample (a hybrid's relative blocks cost more than its plain ones)."""
    depth = model_config.dims.depth

    def total(depth: int, relative: int) -> float:
        fields = {**model_config.model_dump(exclude_unset=True), "depth": depth}
        if model_config.attention != "self_attention":
            fields["relative_blocks"] = relative
        return executed_flops_per_sample(type(model_config)(**fields))

    relative = model_config.num_relative_blocks
    relative_cost = total(2, 2) - total(1, 1)
    plain_cost = total(2, 1) - total(1, 1) if model_config.attention != "self_attention" else relative_cost
    return [relative_cost if i < relative else plain_cost for i in range(depth)]


def balanced_split(costs: list[float], stages: int) -> list[int]:
    """The first block of each stage after the first, minimising the costliest stage (contiguous stages)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[s][i]: the least possible max stage cost of blocks[:i] in s stages; cut[s][i]: where the last begins
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    return sorted(bounds)[1:]


def stage_blocks(cfg: ParallelConfig, model_config) -> list[range]:
    """The blocks of every stage, in pipeline order: ``cfg.pp_split`` or a FLOPs-balanced split."""
    depth = model_config.dims.depth
    split = cfg.pp_split if cfg.pp_split is not None else balanced_split(block_costs(model_config), cfg.num_stages)
    edges = [0, *split, depth]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def stage_indices(cfg: ParallelConfig, pp_rank: int) -> list[int]:
    """The stages one ``pp`` rank runs: its own, or every ``pp``-th for interleaved schedules (loop order)."""
    return [pp_rank + v * cfg.pp for v in range(cfg.pp_virtual_stages)]


def _stage_forward(model: nn.Module, first: bool, last: bool) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        if first:
            x = model.embed(x)
        for block in model.encoder.blocks:
            x = block(x)
        if last:
            x = model.readout(model.encoder.norm(x))
        return x

    return forward


def slice_stage(model: nn.Module, blocks: range, first: bool, last: bool) -> nn.Module:
    """``model`` cut down in place to one stage: ``blocks``, plus the embedding (``first``) and the readout (``last``).

    Parts a stage does not hold become ``None`` (so they hold no parameters and no state-dict
    entries); the blocks it holds keep their index, so parameter names stay those of the whole model.
    """
    owned = {str(i) for i in blocks}
    block_list = model.encoder.blocks
    for key in [k for k in block_list._modules if k not in owned]:
        del block_list._modules[key]  # not ``del blocks[i]``, which renumbers the rest
    if not last:
        model.encoder.norm = None
        for name in READOUT_PARTS:
            if hasattr(model, name):
                setattr(model, name, None)
    if not first:
        embedding = [name for name, _ in model.named_children() if name != "encoder" and name not in READOUT_PARTS]
        embedding += [name for name, _ in model.named_parameters(recurse=False)]
        for name in embedding:
            setattr(model, name, None)
    model.forward = _stage_forward(model, first, last)  # instance attribute: FSDP2's class swap keeps it
    return model


@dataclass
class Pipeline:
    """This rank's stage modules (sliced, not yet sharded) and where they sit in the pipeline."""

    modules: list[nn.Module]
    stage_ids: list[int]
    num_stages: int

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids


def split_model(model: nn.Module, cfg: ParallelConfig, pp_rank: int) -> Pipeline:
    """The stages ``pp_rank`` runs, each a copy of ``model`` sliced by :func:`slice_stage` (``model`` is untouched).

    Build ``model`` on the meta device and materialise the stages after sharding them; a
    materialised ``model`` is copied whole once per stage.
    """
    bounds = stage_blocks(cfg, model.config)
    ids = stage_indices(cfg, pp_rank)
    modules = [slice_stage(copy.deepcopy(model), bounds[i], first=i == 0, last=i == cfg.num_stages - 1) for i in ids]
    return Pipeline(modules, ids, cfg.num_stages)


def build_schedule(pipeline: Pipeline, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device,
                   loss_fn: Callable[[Tensor, Tensor], Tensor]) -> _PipelineSchedule:
    """The ``cfg.pp_schedule`` schedule over this rank's (sharded, materialised) stages.

    ``loss_fn(output, target)`` runs on the last stage per micro-batch; the schedule averages
    the gradients over the micro-batches, so they equal those of the whole batch's mean loss.
    """
    group = mesh["pp"].get_group()
    stages = [PipelineStage(module, index, pipeline.num_stages, device, group=group)
              for module, index in zip(pipeline.modules, pipeline.stage_ids, strict=True)]
    schedule = _SCHEDULES[cfg.pp_schedule]
    if cfg.pp_schedule in MULTI_STAGE_SCHEDULES:
        return schedule(stages, n_microbatches=cfg.pp_microbatches, loss_fn=loss_fn)
    return schedule(stages[0], n_microbatches=cfg.pp_microbatches, loss_fn=loss_fn)


def run_schedule(schedule: _PipelineSchedule, pipeline: Pipeline, inputs: Tensor, targets: Tensor) -> list[Tensor]:
    """One forward and backward of a batch through the pipeline; the micro-batches' losses on the last stage.

    Every ``pp`` rank of a data-parallel rank passes the same batch; only the first stage reads
    the inputs and only the last the targets.
    """
    losses: list[Tensor] = []
    if pipeline.has_first_stage:
        schedule.step(inputs, target=targets if pipeline.has_last_stage else None, losses=losses)
    elif pipeline.has_last_stage:
        schedule.step(target=targets, losses=losses)
    else:
        schedule.step()
    return losses


def pipeline_loss(losses: list[Tensor], pipeline: Pipeline, mesh: DeviceMesh) -> Tensor:
    """The batch's mean loss (over its equal micro-batches) on every ``pp`` rank, summed from the last stage."""
    loss = torch.stack([x.detach().float() for x in losses]).mean() if pipeline.has_last_stage else torch.zeros(
        (), device=mesh.device_type)
    dist.all_reduce(loss, group=mesh["pp"].get_group())
    return loss


@torch.no_grad()
def run_forward(schedule: _PipelineSchedule, pipeline: Pipeline, inputs: Tensor, targets: Tensor) -> Tensor | None:
    """The pipeline's output for a batch, forward only (evaluation): on the last stage, ``None`` elsewhere.

    The targets go to the last stage as in training: 1F1B computes the loss in evaluation too.
    """
    losses: list[Tensor] = []
    last = dict(target=targets, losses=losses) if pipeline.has_last_stage else {}
    output = schedule.eval(inputs, **last) if pipeline.has_first_stage else schedule.eval(**last)
    return output if pipeline.has_last_stage else None
