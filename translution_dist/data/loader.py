"""``build_dataloader``: the trainer's one call, returning a resumable DataLoader and its state.

Ranks are passed in explicitly (the data-parallel rank and size, which tensor-parallel
peers share), never read from the environment, which DataLoader workers started under
``torch.multiprocessing.spawn`` do not see. Every rank gets exactly
``len(loader)`` batches per epoch, whatever the number of shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from translution_dist.data.config import DataConfig
from translution_dist.data.dataset import Position, ShardStream
from translution_dist.data.plan import make_plan
from translution_dist.data.sources import DataInfo, open_source

STATE_VERSION = 1


@dataclass
class DataState:
    """A rank's position in its deterministic stream (for checkpoints) and its skip counters.

    The position always points at the next batch: after the last batch of epoch ``e`` it
    reads ``(e + 1, 0)``. The counters (shards and samples skipped as unreadable, counted
    when the affected batch is consumed) are metrics of this process, not checkpointed; a
    resumed run counts again the skips in the part of the epoch it replays.
    """

    batches_per_epoch: int
    streams: int
    fingerprint: dict[str, Any]
    epoch: int = 0
    batch: int = 0
    stream_positions: list[int] = field(default_factory=list)
    skipped_shards: int = 0
    skipped_samples: int = 0

    def __post_init__(self) -> None:
        self.stream_positions = self.stream_positions or [0] * self.streams

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batch": self.batch,
            "stream_positions": list(self.stream_positions),
            "fingerprint": dict(self.fingerprint),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Resume where ``state`` was saved.

        The saved position only means the same samples under the same settings (rank,
        sizes, seed, data): with ``strict`` a difference raises; without, only the epoch is
        kept and that epoch restarts from its first batch.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        changed = {
            k: (v, self.fingerprint.get(k)) for k, v in state["fingerprint"].items() if self.fingerprint.get(k) != v
        }
        if changed and strict:
            detail = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume the data stream exactly ({detail}); rebuild the loader with the saved "
                f"settings, or load with strict=False to restart epoch {state['epoch']} from its start"
            )
        self.epoch = state["epoch"]
        if changed:
            self.restart_epoch()
        else:
            self.batch = state["batch"]
            self.stream_positions = list(state["stream_positions"])

    def metrics(self) -> dict[str, float]:
        """Counters and position to log (e.g. to MLflow)."""
        return {
            "data/epoch": float(self.epoch),
            "data/skipped_shards": float(self.skipped_shards),
            "data/skipped_samples": float(self.skipped_samples),
        }

    def restart_epoch(self) -> None:
        """Point at the first batch of the current epoch."""
        self.batch = 0
        self.stream_positions = [0] * self.streams

    def position(self) -> Position:
        return Position(self.epoch, self.batch, tuple(self.stream_positions))

    def advance(self, meta: Tensor) -> None:
        """Record one consumed batch from its metadata."""
        index, stream_position, skipped_shards, skipped_samples = meta.tolist()
        if index != self.batch:
            raise RuntimeError(f"expected batch {self.batch} of the epoch, got {index}: batches arrived out of order")
        self.skipped_shards += skipped_shards
        self.skipped_samples += skipped_samples
        self.stream_positions[index % self.streams] = stream_position
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch += 1
            self.restart_epoch()


class ResumableLoader(DataLoader):
    """A DataLoader whose iteration continues from ``state`` and keeps it up to date.

    Each ``iter(loader)`` yields ``(inputs, targets)`` for the rest of the current epoch
    (evaluation loaders: for the whole pass, from its first batch, even after a ``break``);
    ``len(loader)`` is the full epoch. ``info`` describes shapes and label space.
    """

    def __init__(self, dataset: ShardStream, state: DataState, info: DataInfo, cfg: DataConfig) -> None:
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

    def __iter__(self):  # type: ignore[override]  # a generator over (inputs, targets)
        if not self.dataset.train:
            self.state.restart_epoch()
        self.dataset.resume_from = self.state.position()
        for inputs, targets, meta in super().__iter__():
            self.state.advance(meta)
            yield inputs, targets


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
    with ``IGNORE_INDEX`` targets.
    ``batch_size`` is per rank. Save ``state.state_dict()`` per rank in the checkpoint and
    call ``state.load_state_dict(...)`` before iterating to resume exactly.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    train = split == "train" if train is None else train
    source, decoder, info = open_source(cfg, split)
    plan = make_plan(
        source.counts,
        rank=dp_rank,
        ranks=dp_size,
        streams=cfg.streams,
        batch_size=batch_size,
        samples_per_epoch=cfg.samples_per_epoch,
        train=train,
    )
    dataset = ShardStream(
        source,
        decoder,
        plan,
        rank=dp_rank,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        train=train,
    )
    fingerprint = {
        "kind": cfg.kind,
        "split": split,
        "train": train,
        "dp_rank": dp_rank,
        "dp_size": dp_size,
        "batch_size": batch_size,
        "streams": cfg.streams,
        "seed": seed,
        "batches_per_epoch": plan.batches,
        "shuffle_buffer": cfg.shuffle_buffer if train else 0,
        "data": source.digest,
    }
    state = DataState(plan.batches, cfg.streams, fingerprint)
    return ResumableLoader(dataset, state, info, cfg), state
