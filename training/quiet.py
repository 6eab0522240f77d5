"""Warnings a user cannot act on, silenced by their exact message in one place, each with why it does not apply.

Each is printed by every process at every occurrence (the DCP one at every checkpoint of a
one-process run), so they bury the lines that matter. Anything else PyTorch warns about still shows.
"""

from __future__ import annotations

import warnings

UNACTIONABLE = (
    # DTensor's random ops on a CPU mesh: shards in host memory are drawn by the CPU generator, which
    # parallelism/materialize.py seeds per shard itself. (Dropout, model.dropout, is 0 by default; with it
    # under tp on a CPU mesh the ranks draw their masks independently.)
    r"DTensor random operators may not have complete support on cpu device mesh",
    # An in-place op on a bank chunk's output view would skip FSDP2's pre-backward hook; the chunks'
    # outputs are only ever summed out of place (translution_dist/models/attention.py, _sum).
    r"FSDP2-wrapped module \(FSDP(Score|Value)BankChunk\) returned a view tensor",
    # DCP without a process group (a one-process run, engine none) assumes one process: that is the intent
    # (the offline ckpt tools silence it for their own calls: training/checkpoint/locate.py, single_process).
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (save|load) in a single "
    r"process",
)


def silence_unactionable_warnings() -> None:
    """Ignore the :data:`UNACTIONABLE` warnings in this process (every training process calls it at start-up)."""
    for message in UNACTIONABLE:
        warnings.filterwarnings("ignore", message=message)
