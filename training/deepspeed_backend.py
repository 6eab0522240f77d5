"""The training backend over DeepSpeed ZeRO-3 (``parallel.engine: deepspeed``).

DeepSpeed owns gathering, gradient reduction, clipping and the optimizer (offloaded to CPU or
NVMe as configured). Its checkpoints are the DCP checkpoints every engine writes
(:mod:`training.checkpoint.deepspeed_state`), wrapped by the trainer's atomic
protocol: any backend resumes them at any world size, and this one resumes theirs. They are
written synchronously: ``train.async_checkpoint`` does not apply (each parameter is gathered
by collectives of the training thread before anything is written).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallelism.deepspeed_zero import build_deepspeed_engine
from training.backend import DistContext, EvalFn, StepFn, StepResult, all_reduce_mean
from training.checkpoint import deepspeed_state
from training.config import Config
from training.optim import build_adamw, build_schedule
from training.tasks import StepOutput

log = logging.getLogger(__name__)


class DeepSpeedBackend:
    def __init__(self, cfg: Config, ctx: DistContext, model_fn: Callable[[], nn.Module]) -> None:
        self.cfg = cfg
        self.ctx = ctx
        optim = cfg.optim
        # DeepSpeedCPUAdam serves a GPU run whose optimizer lives in host memory; on a machine
        # without GPUs the plain torch AdamW does the same work (and CPUAdam aborts at exit there).
        self.engine = build_deepspeed_engine(
            model_fn, ctx.dims.config, optim, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum, precision=cfg.train.precision,
            lr_scheduler=lambda optimizer: build_schedule(optimizer, cfg),
            cpu_adam=torch.cuda.is_available())
        self.model = self.engine
        self._torch_adamw_defaults = build_adamw([nn.Parameter(torch.zeros(1))], optim).defaults
        if cfg.train.async_checkpoint and ctx.is_main:
            log.warning("train.async_checkpoint does not apply to parallel.engine=deepspeed: its checkpoints are "
                        "written synchronously")

    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def eval_sums(self, batch: tuple, sums_fn: EvalFn) -> dict[str, float]:
        self.engine.eval()
        return sums_fn(self.engine, batch)

    def train_step(self, micro_batches: list, step_fn: StepFn) -> StepResult:
        """Backward every micro-batch; the optimizer step only if the loss is finite on every rank.

        DeepSpeed counts micro-batches to know when to step, so a step cannot be skipped half
        way: a non-finite loss stops the run before its update (``train.nonfinite_loss: stop``).
        """
        self.engine.train()
        total = torch.zeros((), device=self.ctx.device)
        samples = tokens = 0
        for i, batch in enumerate(micro_batches):
            out: StepOutput = step_fn(self.engine, batch)
            self.engine.backward(out.loss)
            total += out.loss.detach().float()
            samples, tokens = samples + out.samples, tokens + out.tokens
            if i < len(micro_batches) - 1:
                self.engine.step()  # inside the accumulation window: no update yet
        loss = all_reduce_mean(total / len(micro_batches), self.ctx)
        if not torch.isfinite(loss):
            return StepResult(loss.item(), float("nan"), samples, tokens, True,
                              f"loss={loss.item():g} (engine deepspeed: the update was not applied)")
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        return StepResult(loss.item(), float(grad_norm if grad_norm is not None else float("nan")),
                          samples, tokens, False, None)

    def save_state(self, path: Path, asynchronous: bool) -> Future | None:
        """Write ``path/dcp`` now, whatever ``asynchronous`` says (see the module docstring)."""
        deepspeed_state.save(self.engine, path, self._torch_adamw_defaults)
        return None

    def load_state(self, path: Path) -> None:
        deepspeed_state.load(self.engine, path)

    def scheduler_state(self) -> dict[str, Any]:
        return self.engine.lr_scheduler.state_dict()

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        self.engine.lr_scheduler.load_state_dict(state)

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model on rank 0's CPU, gathered layer by layer (collective)."""
        return self.engine._zero3_consolidated_16bit_state_dict()
