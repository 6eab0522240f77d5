"""``python -m launcher.torchrun ARGS``: torchrun with ARGS unchanged, ending a preempted run with a retryable status.

A stop signal to torchrun (SIGTERM from the kubelet or SLURM, SIGUSR1 as SLURM's early warning
when ``translution launch`` lists it in ``TORCHELASTIC_SIGNALS_TO_HANDLE``, Ctrl-C) is
forwarded to the ranks, which checkpoint and exit 128 + the signal (training/preemption.py);
within ``--shutdown-timeout`` seconds, after which torchrun kills them. Stock torchrun then
raises ``SignalException``: a traceback and exit status 1, which Kubernetes' ``ExitCode``
restart policy takes for a permanent failure. Here that ends in one line and 128 + the signal,
and so does a run whose ranks all stopped on a signal of their own (SLURM may signal every
process of the step). Any other failure is torchrun's, reported as torchrun reports it.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

STOP_EXIT_CODES = {128 + s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
"""What a rank that checkpointed and stopped on a signal exits with."""


def _stopped(signum: int) -> int:
    print(f"translution launch: {signal.Signals(signum).name}: the ranks checkpointed and stopped; "
          "run the same command again to resume", file=sys.stderr, flush=True)
    return 128 + signum


def main(argv: list[str]) -> int:
    try:
        torchrun_main(argv)
    except SignalException as stop:
        return _stopped(stop.sigval)
    except ChildFailedError as failed:
        codes = {failure.exitcode for failure in failed.failures.values()}
        if len(codes) == 1 and codes <= STOP_EXIT_CODES:
            return _stopped(codes.pop() - 128)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
