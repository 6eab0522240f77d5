"""What the trainer drives: one interface over the torch and the DeepSpeed training backends.

A backend owns the model, its optimizer and its learning-rate schedule. The trainer asks it
for an optimizer step, for its state in the one checkpoint layout (``training.checkpoint``)
and for the consolidated model; how parameters are sharded, reduced and stored is the
backend's business (``parallel.engine`` picks which ZeRO-3 engine shards them).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallelism.layout import ParallelDims
from training.tasks import StepOutput

StepFn = Callable[[nn.Module, tuple], StepOutput]
"""One micro-batch's forward: the model and the batch in, the loss and its counts out."""
EvalFn = Callable[[nn.Module, tuple], dict[str, float]]
"""One evaluation batch: the model and the batch in, sums of its metrics out."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank, device, resolved layout and mesh, and its data-parallel coordinates."""

    rank: int
    local_rank: int
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh | None  # None: one process without a process group
    dp_rank: int
    dp_size: int

    @property
    def world_size(self) -> int:
        return self.dims.world_size

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


class TrainingBackend(Protocol):
    model: nn.Module

    def train_step(self, micro_batches: list, step_fn: StepFn) -> StepResult: ...
    def eval_sums(self, batch: tuple, sums_fn: EvalFn) -> dict[str, float]: ...
    def save_state(self, path: Path, asynchronous: bool) -> Future | None: ...
    def load_state(self, path: Path) -> None: ...
    def full_model_state(self) -> dict[str, torch.Tensor] | None: ...
    def lr(self) -> float: ...
    def scheduler_state(self) -> dict[str, Any]: ...
    def load_scheduler_state(self, state: dict[str, Any]) -> None: ...


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: bf16/fp16 where the device autocasts to it, else fp32."""
    if precision == "fp32" or (precision == "fp16" and device.type == "cpu"):
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast_context(precision: str, device: torch.device):
    """Autocast to bf16/fp16 where the device supports it; fp32 runs as is."""
    dtype = compute_dtype(precision, device)
    if dtype is torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over every rank (gloo has no AVG, so SUM and divide)."""
    if ctx.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return value
