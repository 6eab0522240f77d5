"""The torch backend over one pipeline stage (``parallel.pp > 1``): each step runs the pp schedule.

Every ``pp`` rank of a data-parallel rank reads the same batch (in evaluation too: a
forward-only schedule, the sums computed on the last stage and sent to the others) (the loaders shard by the
data-parallel coordinates only); the first stage feeds the inputs, the last computes the loss
per micro-batch, and the schedule averages the gradients over them. The step's loss is summed
from the last stage to every stage, so logging and the trainer's metrics see it on every rank;
gradients are clipped by the norm of the whole model (all stages). Checkpoints hold the stage's
parameters under the whole model's names (:mod:`parallelism.pipeline`), one layout at any ``pp``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from parallelism.pipeline import Pipeline, build_schedule, pipeline_loss, run_forward, run_schedule
from training.backend import DistContext, EvalFn, StepFn, autocast_context
from training.config import Config
from training.grad_norm import clip_grad_norm
from training.torch_backend import TorchBackend


def stage_loss(output: Tensor, target: Tensor) -> Tensor:
    """The tasks' training loss (``training.tasks``: cross-entropy over classes or tokens) on the last stage."""
    return F.cross_entropy(output.float().flatten(0, -2), target.flatten())


class PipelineBackend(TorchBackend):
    """:class:`TorchBackend` whose model is this rank's (sharded, materialised) pipeline stage."""

    def __init__(self, cfg: Config, ctx: DistContext, pipeline: Pipeline) -> None:
        if len(pipeline.modules) != 1:
            raise ValueError("the trainer runs one pipeline stage per rank; interleaved schedules "
                             "(pp_virtual_stages > 1) are not wired into it yet")
        super().__init__(cfg, ctx, pipeline.modules[0])
        self.pipeline = pipeline
        self.pipeline_group = ctx.mesh["pp"].get_group()
        self.schedule = build_schedule(pipeline, ctx.dims.config, ctx.mesh, ctx.device, stage_loss)

    def forward_backward(self, micro_batches: list, step_fn: StepFn) -> tuple[Tensor, int, int]:
        """The accumulated micro-batches as one batch through the schedule (it cuts ``pp_microbatches``)."""
        inputs = torch.cat([batch[0] for batch in micro_batches])
        targets = torch.cat([batch[1] for batch in micro_batches])
        with autocast_context(self.cfg.train.precision, self.ctx.device):
            losses = run_schedule(self.schedule, self.pipeline, inputs, targets)
        return pipeline_loss(losses, self.pipeline, self.ctx.mesh), inputs.shape[0], targets.numel()

    def clip_gradients(self) -> Tensor:
        return clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip, pipeline_group=self.pipeline_group)

    def eval_sums(self, batch: tuple, sums_fn: EvalFn) -> dict[str, float]:
        """The task's sums on the last stage's logits (a forward-only schedule), sent to every stage."""
        self.model.eval()
        with autocast_context(self.cfg.train.precision, self.ctx.device):
            logits = run_forward(self.schedule, self.pipeline, *batch)
        box = [sums_fn(lambda _inputs: logits, batch) if self.pipeline.has_last_stage else None]
        dist.broadcast_object_list(box, group=self.pipeline_group, group_src=self.ctx.dims.pp_size - 1)
        return box[0]

    def full_model_state(self) -> dict[str, Tensor] | None:
        """Every stage's full state merged on rank 0 (collective: every rank must call it)."""
        # Not cpu_offload=True: that keeps the state on global rank 0 only, which holds the first stage alone.
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        stages: list[dict[str, Tensor] | None] = [None] * self.ctx.world_size
        coordinate = self.ctx.mesh.get_coordinate() or []
        sender = all(c == 0 for c in coordinate[1:])  # one rank per stage: the first of its data/model-parallel peers
        dist.all_gather_object(stages, {k: v.cpu() for k, v in state.items()} if sender else None)
        if not self.ctx.is_main:
            return None
        return {name: tensor for stage in stages if stage for name, tensor in stage.items()}
