"""The training backend for one process, FSDP2, tp and dispp: a model sharded by ``parallelism``, AdamW."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from parallelism.compile import apply_compile
from training.backend import DistContext, EvalFn, StepFn, StepResult, all_reduce_mean, autocast_context
from training.checkpoint import torch_state
from training.config import Config
from training.grad_norm import clip_grad_norm
from training.optim import adamw_for, build_schedule
from training.tasks import StepOutput


def _nonfinite_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, limit: int = 5) -> str:
    """Where the gradients are not finite: ``param group G (name, …)`` per optimizer group, ``limit`` names each."""
    names = {p: name for name, p in model.named_parameters()}
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        bad = [names.get(p, "?") for p in group["params"] if p.grad is not None
               and not torch.isfinite(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).all()]
        if bad:
            more = f", … {len(bad) - limit} more" if len(bad) > limit else ""
            groups.append(f"param group {index} ({len(bad)} of {len(group['params'])} parameters: "
                          f"{', '.join(bad[:limit])}{more})")
    return "; ".join(groups)


class TorchBackend:
    """A model built on meta, sharded by ``parallelism.parallelize``, trained with AdamW; DCP checkpoints."""

    def __init__(self, cfg: Config, ctx: DistContext, model: nn.Module) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.model = apply_compile(model, cfg.train.compile_mode) if cfg.train.compile else model
        self.optimizer = adamw_for(model, cfg.optim)
        self.scheduler = build_schedule(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.precision == "fp16"
                                           and ctx.device.type == "cuda")
        self._async_group: dist.ProcessGroup | None = None

    def _checkpoint_group(self) -> dist.ProcessGroup:
        """A gloo group of all ranks for asynchronous saves (made once, collectively, on first use).

        ``dcp.async_save`` finishes its collectives from a background thread; on the training
        group they would interleave with the next step's and desynchronise it (gloo aborts with
        a size mismatch), so they get a group of their own, on the CPU where the staged copy lives.
        """
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _sync_gradients(self, enabled: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: skip reductions while accumulating
            self.model.set_requires_gradient_sync(enabled)

    def eval_sums(self, batch: tuple, sums_fn: EvalFn) -> dict[str, float]:
        self.model.eval()
        return sums_fn(self.model, batch)

    def forward_backward(self, micro_batches: list, step_fn: StepFn) -> tuple[torch.Tensor, int, int]:
        """Gradients of the step's mean loss; returns that loss (this rank's), samples and tokens."""
        total_loss = torch.zeros((), device=self.ctx.device)
        samples = tokens = 0
        for i, batch in enumerate(micro_batches):
            self._sync_gradients(i == len(micro_batches) - 1)
            with autocast_context(self.cfg.train.precision, self.ctx.device):
                out: StepOutput = step_fn(self.model, batch)
            self.scaler.scale(out.loss / len(micro_batches)).backward()
            total_loss += out.loss.detach().float()
            samples, tokens = samples + out.samples, tokens + out.tokens
        return total_loss / len(micro_batches), samples, tokens

    def clip_gradients(self) -> torch.Tensor:
        return clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip)

    def train_step(self, micro_batches: list, step_fn: StepFn) -> StepResult:
        self.model.train()
        step_loss, samples, tokens = self.forward_backward(micro_batches, step_fn)
        loss = all_reduce_mean(step_loss, self.ctx)
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip_gradients()
        nonfinite = None
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            where = _nonfinite_gradients(self.model, self.optimizer)
            nonfinite = f"loss={loss.item():g}, grad_norm={grad_norm.item():g}" + (
                f"; non-finite gradients in {where}" if where else "")
        skipped = nonfinite is not None
        if not skipped:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.item(), grad_norm.item(), samples, tokens, skipped, nonfinite)

    def save_state(self, path: Path, asynchronous: bool) -> Future | None:
        group = self._checkpoint_group() if asynchronous and dist.is_initialized() else None
        return torch_state.save(self.model, self.optimizer, path, async_group=group,
                                pipeline_group=self.pipeline_group)

    def load_state(self, path: Path) -> None:
        torch_state.load(self.model, self.optimizer, path)

    pipeline_group: dist.ProcessGroup | None = None
    """The ``pp`` ranks when this rank holds one pipeline stage (:class:`training.pipeline_backend.PipelineBackend`)."""

    def scheduler_state(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model on rank 0's CPU (collective: every rank must call it)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return state if self.ctx.is_main else None
