"""Training engines: one interface over PyTorch (plain/FSDP2/TP/displacement-parallel) and DeepSpeed.

The trainer asks an engine for a model step, a checkpoint write and a checkpoint read; how
parameters are sharded, reduced and stored is the engine's business.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from translution_dist.config import Config, OptimSection
from translution_dist.train.grad_norm import clip_grad_norm
from translution_dist.train.schedule import warmup_cosine
from translution_dist.train.tasks import StepOutput


@dataclass
class DistContext:
    """Where this process sits: global rank/size, device, mesh, and its data-parallel coordinates."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Any  # DeviceMesh or None for a single process
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    samples: int
    tokens: int
    skipped: bool
    nonfinite: str | None  # what was not finite, for the message


class Engine(Protocol):
    model: nn.Module

    def train_step(self, micro_batches: list, step_fn) -> StepResult: ...
    def save_state(self, path: Path, asynchronous: bool) -> Future | None: ...
    def load_state(self, path: Path) -> None: ...
    def full_model_state(self) -> dict[str, torch.Tensor] | None: ...
    def lr(self) -> float: ...
    def scheduler_state(self) -> dict[str, Any]: ...
    def load_scheduler_state(self, state: dict[str, Any]) -> None: ...


def autocast_context(precision: str, device: torch.device):
    """Autocast to bf16/fp16 where the device supports it; fp32 runs as is."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype is torch.float16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over every rank (gloo has no AVG, so SUM and divide)."""
    if ctx.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


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


def build_adamw(params: list, optim: OptimSection, foreach: bool = True) -> torch.optim.AdamW:
    """The torch engines' optimizer; its param group is also what a DeepSpeed checkpoint records."""
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                             foreach=foreach)


def _adamw_for(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW over the model's parameters in one group, as every engine's checkpoint records them.

    tp/dispp without FSDP leave some parameters plain next to the DTensors; the foreach kernels
    cannot mix the two, so such a model steps parameter by parameter (the same arithmetic).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    mixed = len({isinstance(p, DTensor) for p in params}) > 1
    return build_adamw(params, optim, foreach=not mixed)


class TorchEngine:
    """A model built on meta, sharded by ``parallelism.parallelize``, trained with AdamW; DCP checkpoints."""

    def __init__(self, cfg: Config, ctx: DistContext, model: nn.Module) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.model = model
        optim = cfg.optim
        self.optimizer = _adamw_for(model, optim)
        self.scheduler = warmup_cosine(self.optimizer, lr=optim.lr, min_lr=optim.min_lr,
                                       warmup_steps=optim.warmup_steps, total_steps=cfg.train.steps)
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

    def train_step(self, micro_batches: list, step_fn) -> StepResult:
        self.model.train()
        total_loss = torch.zeros((), device=self.ctx.device)
        samples = tokens = 0
        for i, batch in enumerate(micro_batches):
            self._sync_gradients(i == len(micro_batches) - 1)
            with autocast_context(self.cfg.train.precision, self.ctx.device):
                out: StepOutput = step_fn(self.model, batch)
            self.scaler.scale(out.loss / len(micro_batches)).backward()
            total_loss += out.loss.detach().float()
            samples, tokens = samples + out.samples, tokens + out.tokens
        loss = all_reduce_mean(total_loss / len(micro_batches), self.ctx)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip)
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

    def _state(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save_state(self, path: Path, asynchronous: bool) -> Future | None:
        state = self._state()
        if asynchronous and dist.is_initialized():
            return dcp.async_save(state, checkpoint_id=str(path / "dcp"), process_group=self._checkpoint_group())
        dcp.save(state, checkpoint_id=str(path / "dcp"))
        return None

    def load_state(self, path: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        foreach = [group["foreach"] for group in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for group, value in zip(self.optimizer.param_groups, foreach):  # how to step is this layout's choice
            group["foreach"] = value

    def scheduler_state(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model on rank 0's CPU (collective: every rank must call it)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return state if self.ctx.is_main else None
