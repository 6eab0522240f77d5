"""Stop cleanly on SIGTERM (Kubernetes, torchrun), SIGUSR1 (SLURM's early warning) and SIGINT (Ctrl-C).

The handler only records the signal. The loop asks :meth:`StopRequest.agreed` at every step
boundary and between evaluation batches, which combines the record over all ranks (a
one-element all-reduce), so all ranks stop at the same point even when the signal reached only
one of them. The loop then writes a checkpoint synchronously, marks the MLflow run KILLED and
raises :class:`Stopped`; the process exits with 128 + the signal number, as a shell reports a
process ended by it (a status Kubernetes' ``ExitCode`` restart policy and ``translution launch``
treat as retryable), and a relaunch resumes from that step.

A scheduler's signal may arrive twice (SLURM signals every process of the step, torchrun then
forwards it), so only a second Ctrl-C takes the default action and quits at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from training.backend import DistContext

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""SIGUSR1: what ``#SBATCH --signal=USR1@SECONDS`` sends before a SLURM job's time limit."""


class Stopped(Exception):
    """The run stopped on a signal after writing a checkpoint; exit with :attr:`exit_code`."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Records the stop signals while installed; :meth:`agreed` is the signal any rank received (0: none)."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum and signum == signal.SIGINT:  # Ctrl-C twice: stop waiting for the checkpoint
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal any rank has received (collective: every rank calls it at the same step)."""
        if self.ctx.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
