"""Fault injection for the reliability suite: ``$TRANSLUTION_FAULT`` kills, hangs or poisons a rank.

The run wraps its backend in :class:`FaultInjectingBackend` only when the variable is set, so
a normal run pays nothing and the loop knows nothing of it. Faults are written
``ACTION@POINT:N[:rank:R][:restart:K][:seconds:S]`` (see docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.backend import EvalFn, StepFn, StepResult, TrainingBackend
from training.config import ConfigError
from training.tasks import StepOutput

log = logging.getLogger("translution.train")

FAULT_ENV = "TRANSLUTION_FAULT"
FAULT_ACTIONS = {"kill": ("step", "checkpoint", "eval"), "hang": ("step", "checkpoint", "eval"), "nan": ("step",)}


@dataclass(frozen=True)
class Fault:
    """One fault to inject: ``ACTION@POINT:N[:rank:R][:restart:K][:seconds:S]``."""

    action: str
    point: str
    at: int
    rank: int | None = None
    restart: int | None = None
    seconds: float = 86400.0


def parse_faults(spec: str) -> list[Fault]:
    """The comma-separated faults of ``$TRANSLUTION_FAULT``; a typo is an error, never a silent no-op."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, _, where = item.partition("@")
        fields = where.split(":")
        try:
            if action not in FAULT_ACTIONS or fields[0] not in FAULT_ACTIONS[action] or len(fields) % 2:
                raise ValueError(item)
            options = dict(zip(fields[2::2], fields[3::2], strict=True))
            if not options.keys() <= {"rank", "restart", "seconds"}:
                raise ValueError(item)
            faults.append(Fault(action, fields[0], int(fields[1]), *(
                int(options[k]) if k in options else None for k in ("rank", "restart")),
                float(options.get("seconds", Fault.seconds))))
        except ValueError as err:
            raise ConfigError(f"{FAULT_ENV}: cannot parse {item!r}; expected ACTION@POINT:N[:rank:R][:restart:K]"
                              f"[:seconds:S] with ACTION@POINT one of kill@step, kill@checkpoint, kill@eval, "
                              f"hang@step, hang@checkpoint, hang@eval, nan@step") from err
    return faults


def faults_for(rank: int) -> list[Fault]:
    """The faults of ``$TRANSLUTION_FAULT`` meant for this rank and this torchrun restart."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return [f for f in parse_faults(os.environ.get(FAULT_ENV, ""))
            if f.rank in (None, rank) and f.restart in (None, restart)]


def _poisoned(step_fn: StepFn) -> StepFn:
    """``step_fn`` whose loss is NaN, so the gradients are NaN too."""
    def step(model: torch.nn.Module, batch: tuple) -> StepOutput:
        out = step_fn(model, batch)
        out.loss = out.loss * float("nan")
        return out
    return step


class FaultInjectingBackend:
    """A backend whose optimizer steps and checkpoint writes meet the faults due at them.

    ``step@N`` acts before optimizer step ``N``; ``checkpoint@N`` after the shards of the
    checkpoint of step ``N`` are written and before that checkpoint is marked complete;
    ``eval@N`` at the first batch of the evaluation after step ``N``.
    ``completed_steps`` reads the loop's step counter, which a resume sets.
    """

    def __init__(self, backend: TrainingBackend, faults: list[Fault], rank: int,
                 completed_steps: Callable[[], int]) -> None:
        self._backend = backend
        self._faults = faults
        self._rank = rank
        self._completed_steps = completed_steps
        self._evaluated_at: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def _inject(self, point: str, at: int) -> bool:
        """Act on what is due at ``point`` ``at`` (kill, hang); True if this step's loss is to be made NaN."""
        poison = False
        for fault in self._faults:
            if (fault.point, fault.at) != (point, at):
                continue
            log.warning("%s: %s at %s %d on rank %d", FAULT_ENV, fault.action, point, at, self._rank)
            if fault.action == "kill":
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.action == "hang":
                time.sleep(fault.seconds)
            else:
                poison = True
        return poison

    def train_step(self, micro_batches: list, step_fn: StepFn) -> StepResult:
        if self._inject("step", self._completed_steps() + 1):
            step_fn = _poisoned(step_fn)
        return self._backend.train_step(micro_batches, step_fn)

    def eval_sums(self, batch: tuple, sums_fn: EvalFn) -> dict[str, float]:
        step = self._completed_steps()
        if self._evaluated_at != step:
            self._evaluated_at = step
            self._inject("eval", step)
        return self._backend.eval_sums(batch, sums_fn)

    def save_state(self, path: Path, asynchronous: bool):
        pending = self._backend.save_state(path, asynchronous)
        self._inject("checkpoint", self._completed_steps())  # shards written, checkpoint not complete yet
        return pending
