"""The trainer's engine interface over DeepSpeed ZeRO-3 (``parallel.engine: deepspeed``).

DeepSpeed owns gathering, gradient reduction, clipping, the optimizer (offloaded to CPU or
NVMe as configured) and its own checkpoint files, which the trainer's atomic checkpoint
protocol wraps like DCP's. A DeepSpeed checkpoint reloads at the world size it was written
at; DeepSpeed's universal checkpoints (``python -m deepspeed.checkpoint.ds_to_universal``)
cover other sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallelism.deepspeed_engine import build_deepspeed_engine
from translution_dist.config import Config
from translution_dist.train.checkpoint import CheckpointError
from translution_dist.train.engine import DistContext, StepResult, all_reduce_mean
from translution_dist.train.schedule import warmup_cosine
from translution_dist.train.tasks import StepOutput

CHECKPOINT_DIR = "deepspeed"
CHECKPOINT_TAG = "state"


class DeepSpeedTrainEngine:
    def __init__(self, cfg: Config, ctx: DistContext, model_fn: Callable[[], nn.Module]) -> None:
        self.cfg = cfg
        self.ctx = ctx
        optim = cfg.optim

        def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return warmup_cosine(optimizer, lr=optim.lr, min_lr=optim.min_lr, warmup_steps=optim.warmup_steps,
                                 total_steps=cfg.train.steps)

        # DeepSpeedCPUAdam serves a GPU run whose optimizer lives in host memory; on a machine
        # without GPUs the plain torch AdamW does the same work (and CPUAdam aborts at exit there).
        self.engine = build_deepspeed_engine(
            model_fn, cfg.parallel, optim, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum, precision=cfg.train.precision, lr_scheduler=schedule,
            cpu_adam=torch.cuda.is_available())
        self.model = self.engine

    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def train_step(self, micro_batches: list, step_fn) -> StepResult:
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
        self.engine.save_checkpoint(str(path / CHECKPOINT_DIR), tag=CHECKPOINT_TAG, save_latest=False)
        return None

    def load_state(self, path: Path) -> None:
        if not (path / CHECKPOINT_DIR).is_dir():
            raise CheckpointError(f"{path} holds no DeepSpeed state (written by engine fsdp/none); convert it with "
                                  "`translution ckpt export` and start from the weights, or resume with that engine")
        try:
            self.engine.load_checkpoint(str(path / CHECKPOINT_DIR), tag=CHECKPOINT_TAG)
        except (RuntimeError, AssertionError, ValueError) as err:
            raise CheckpointError(f"DeepSpeed could not load {path}: {err}; a DeepSpeed checkpoint reloads at the "
                                  "world size it was written at (python -m deepspeed.checkpoint.ds_to_universal "
                                  "converts it for others)") from err

    def scheduler_state(self) -> dict[str, Any]:
        return self.engine.lr_scheduler.state_dict()

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        self.engine.lr_scheduler.load_state_dict(state)

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model on rank 0's CPU, gathered layer by layer (collective)."""
        return self.engine._zero3_consolidated_16bit_state_dict()
