"""Stall diagnosis: when a collective times out, say which rank stalled and what the loop was doing.

The process group cannot tell (gloo closes its connections on a timeout), but the ranks
blocked in the same collective time out together, so the ones that do not report a timeout
through torchrun's store within seconds are the culprits. The run wraps the loop in
:func:`diagnose_stalls`; the loop itself only keeps its ``phase`` up to date.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("translution.train")

TIMEOUT_REPORT_S = 5  # after a collective timeout, how long the other ranks get to report theirs


class CollectiveTimeoutError(RuntimeError):
    """A collective outlived ``train.collective_timeout_s``: another rank stalled or died before joining it."""


def _is_timeout(err: BaseException) -> bool:
    """Whether a distributed error is a collective that outlived the process group's timeout."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def _silent_ranks(rank: int, world_size: int, phase: str) -> str:
    """Which ranks stalled: those that do not also report a timeout, through torchrun's store, within seconds."""
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=TIMEOUT_REPORT_S))
        prefix = f"translution/collective_timeout/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.set(f"{prefix}/{rank}", phase)
        others = [r for r in range(world_size) if r != rank]
        deadline = time.monotonic() + TIMEOUT_REPORT_S
        while True:
            others = [r for r in others if not store.check([f"{prefix}/{r}"])]
            if not others or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    except (KeyError, ValueError, RuntimeError) as err:
        return f"could not ask the other ranks ({err}): look for the rank whose log lacks this error"
    if not others:
        return "every rank timed out, so they waited in different collectives (a desynchronised program)"
    return (f"rank(s) {', '.join(map(str, others))} did not report a timeout within {TIMEOUT_REPORT_S}s: "
            "they stalled or died")


@contextmanager
def diagnose_stalls(rank: int, world_size: int, timeout_s: int, phase: Callable[[], str]) -> Iterator[None]:
    """Turn a collective timeout inside the block into a :class:`CollectiveTimeoutError` that names the culprits."""
    try:
        yield
    except RuntimeError as err:
        if world_size == 1 or not _is_timeout(err):
            raise
        frames = [f.name for f in traceback.extract_tb(err.__traceback__) if f.filename.endswith("distributed_c10d.py")]
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = phase()
        message = (f"rank {rank} of {world_size}: collective {frames[-1] if frames else '?'} in {where} did not "
                   f"complete within train.collective_timeout_s={timeout_s}s ({cause}); "
                   f"{_silent_ranks(rank, world_size, where)}")
        log.error("%s", message)
        raise CollectiveTimeoutError(message) from err
