"""``build_dataloader``: the trainer's one call, returning a resumable DataLoader and its state.

Ranks are passed in explicitly (the data-parallel rank and size, which tensor-parallel
peers share), never read from the environment, which DataLoader workers started under
``torch.multiprocessing.spawn`` do not see. All ranks cut the same global order into global
batches of ``dp_size x batch_size`` samples, so the data position -- samples of the epoch
consumed -- is one number for the whole run, and a checkpoint taken under one world size or
layout resumes under any other at exactly the next sample.

``TRANSLUTION_DATA_TRACE=DIR`` (a debugging aid, off by default) makes every training loader
append one line per consumed batch to ``DIR/trace-<pid>.txt``:
``epoch first dp_rank id id ...``, ``first`` being the batch's place in the epoch and the ids
the sample positions in the split (shards in ``index.json`` order).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from translution_dist.data.config import DataConfig
from translution_dist.data.dataset import Position, RankBatches
from translution_dist.data.sources import DataInfo, open_source

log = logging.getLogger(__name__)

STATE_VERSION = 2
"""1: per-rank stream positions (valid only at the same ranks and workers); 2: the global position."""

TRACE_ENV = "TRANSLUTION_DATA_TRACE"


@dataclass
class DataState:
    """The run's data position, the same on every rank (for checkpoints), and this process's skip counters.

    The position is ``(epoch, consumed, length)``: samples of the epoch's global order consumed,
    out of the epoch's length, fixed when the epoch starts. It always points at the next global
    batch; an epoch ends when fewer than one global batch of samples is left (that tail is not
    read), and the next starts at sample 0. The counters (shards found damaged, samples that
    could not be used, counted when the affected batch is consumed) are metrics of this
    process, not checkpointed.
    """

    fingerprint: dict[str, Any]
    """What the order depends on: a saved position means the same samples only if these match."""
    global_batch: int
    """Samples consumed per batch by all data-parallel ranks together."""
    epoch_length: int
    """Length of an epoch started under this loader's settings."""
    train: bool = True
    epoch: int = 0
    consumed: int = 0
    length: int = 0
    skipped_shards: int = 0
    skipped_samples: int = 0

    def __post_init__(self) -> None:
        self.length = self.length or self.epoch_length

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "length": self.length,
            "fingerprint": dict(self.fingerprint),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Resume where ``state`` was saved, whatever world size, layout, batch size or workers saved it.

        The position means the same samples only under the same order (data, split, seed,
        shuffle): with ``strict`` a difference raises; without, a warning says that epoch
        ``state['epoch']`` restarts from its first sample. A version-1 state (per-rank streams)
        cannot be mapped onto the order: strict raises, otherwise its epoch restarts.
        """
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"data state version {version!r} is neither 1 nor {STATE_VERSION}")
        changed = {
            k: (v, self.fingerprint.get(k))
            for k, v in state["fingerprint"].items()
            if k in self.fingerprint and self.fingerprint[k] != v
        }
        if version == 1:
            problem = "it was saved as per-rank stream positions (data state version 1), before the global order"
        else:
            problem = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        if problem and strict:
            raise ValueError(
                f"cannot resume the data position exactly ({problem}); rebuild the loader with the saved "
                f"settings, or load with strict=False to restart epoch {state['epoch']} from its start"
            )
        self.epoch = state["epoch"]
        if problem:
            log.warning("the data position cannot be resumed exactly (%s): epoch %d restarts from its first sample",
                        problem, self.epoch)
            self.consumed, self.length = 0, self.epoch_length
        else:
            self.consumed, self.length = state["consumed"], state["length"]
            self._end_epoch_if_done()

    def describe(self) -> str:
        return f"sample {self.consumed} of {self.length} in epoch {self.epoch}"

    def metrics(self) -> dict[str, float]:
        """Counters and position to log (e.g. to MLflow)."""
        return {
            "data/epoch": float(self.epoch),
            "data/skipped_shards": float(self.skipped_shards),
            "data/skipped_samples": float(self.skipped_samples),
        }

    def restart(self) -> None:
        """Back to the first sample of epoch 0 (an evaluation pass)."""
        self.epoch, self.consumed, self.length = 0, 0, self.epoch_length

    def position(self) -> Position:
        return Position(self.epoch, self.consumed, self.length)

    def advance(self, meta: Tensor) -> None:
        """Record one consumed batch from its metadata."""
        first, skipped_shards, skipped_samples = meta[:3].tolist()
        if first != self.consumed:
            raise RuntimeError(
                f"expected the batch at sample {self.consumed} of the epoch, got {first}: batches arrived out of order"
            )
        self.skipped_shards += skipped_shards
        self.skipped_samples += skipped_samples
        self.consumed += self.global_batch
        if self.train:
            self._end_epoch_if_done()

    def _end_epoch_if_done(self) -> None:
        if self.length - self.consumed < self.global_batch:
            self.epoch, self.consumed, self.length = self.epoch + 1, 0, self.epoch_length


class ResumableLoader(DataLoader):
    """A DataLoader whose iteration continues from ``state`` and keeps it up to date.

    Each ``iter(loader)`` yields ``(inputs, targets)`` for the rest of the current epoch
    (evaluation loaders: for the whole pass, from its first batch, even after a ``break``);
    ``len(loader)`` is a whole epoch. ``info`` describes shapes and label space.
    """

    def __init__(
        self, dataset: RankBatches, state: DataState, info: DataInfo, cfg: DataConfig, trace: Path | None = None
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            persistent_workers=False,
            multiprocessing_context=cfg.worker_start_method if cfg.num_workers else None,
            in_order=True,
        )
        self.state = state
        self.info = info
        self.trace = trace

    def __len__(self) -> int:
        return self.dataset.batches(Position(self.state.epoch, 0, self.state.length))

    def __iter__(self):  # type: ignore[override]  # a generator over (inputs, targets)
        if not self.dataset.train:
            self.state.restart()
        self.dataset.start = self.state.position()
        for inputs, targets, meta in super().__iter__():
            if self.trace is not None:
                self._record(meta)
            self.state.advance(meta)
            yield inputs, targets

    def _record(self, meta: Tensor) -> None:
        self.trace.mkdir(parents=True, exist_ok=True)
        ids = " ".join(map(str, meta[3:].tolist()))
        with open(self.trace / f"trace-{os.getpid()}.txt", "a") as out:
            out.write(f"{self.state.epoch} {int(meta[0])} {self.dataset.rank} {ids}\n")


def epoch_length(total: int, cfg: DataConfig, dp_size: int, train: bool) -> int:
    """Samples in an epoch's global order: ``data.samples_per_epoch`` per rank, or the split
    (evaluation: at most the split)."""
    if cfg.samples_per_epoch is None:
        return total
    requested = cfg.samples_per_epoch * dp_size
    return requested if train else min(total, requested)


def build_dataloader(
    cfg: DataConfig,
    *,
    split: str,
    dp_rank: int,
    dp_size: int,
    batch_size: int,
    seed: int,
    train: bool | None = None,
) -> tuple[ResumableLoader, DataState]:
    """Build the loader of one data-parallel rank.

    ``train`` (default: ``split == "train"``) shuffles; evaluation reads in order, starts
    every ``iter`` at its first batch and covers the split once, marking padding repeats
    with ``IGNORE_INDEX`` targets. ``batch_size`` is per rank. ``state`` is the same on
    every rank: save ``state.state_dict()`` once in the checkpoint and call
    ``state.load_state_dict(...)`` before iterating to resume exactly, under any layout.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    train = split == "train" if train is None else train
    source, decoder, info = open_source(cfg, split)
    total = sum(source.counts)
    if total == 0:
        raise ValueError(f"the {split!r} split has no samples")
    length = epoch_length(total, cfg, dp_size, train)
    if train and length < dp_size * batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {length // dp_size} samples per rank per epoch "
            f"({length} samples over {dp_size} ranks); lower it or raise data.samples_per_epoch"
        )
    dataset = RankBatches(
        source,
        decoder,
        rank=dp_rank,
        ranks=dp_size,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        train=train,
    )
    fingerprint = {
        "kind": cfg.kind,
        "split": split,
        "train": train,
        "seed": seed,
        "shuffle_buffer": cfg.shuffle_buffer if train else 0,
        "data": source.digest,
    }
    state = DataState(fingerprint, dp_size * batch_size, length, train=train)
    trace = os.environ.get(TRACE_ENV)
    return ResumableLoader(dataset, state, info, cfg, Path(trace) if trace and train else None), state
