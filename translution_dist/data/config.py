"""The data section of a training config.

Defaults make a small CPU run work with no files at all (synthetic data, no worker
processes); a real run sets ``kind`` and ``path`` to a directory written by
``translution data ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, model_validator

DataKind = Literal["mnist", "text", "image_folder", "synthetic"]


class SyntheticConfig(BaseModel):
    """Shapes of the deterministic random data used by tests and benchmarks."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["image", "text"] = "image"
    samples: PositiveInt = 1024
    """Samples in every split."""
    samples_per_shard: PositiveInt = 128
    """Size of the virtual shards, so that synthetic runs exercise the same sharding plan."""
    channels: PositiveInt = 1
    image_size: PositiveInt = 84
    num_classes: PositiveInt = 10
    context_length: PositiveInt = 64
    vocab_size: PositiveInt = 256


class DataConfig(BaseModel):
    """Where the samples come from and how each data-parallel rank streams them."""

    model_config = ConfigDict(extra="forbid")

    kind: DataKind = "synthetic"
    path: Path | None = None
    """Directory holding ``index.json`` and the shards (not used by ``synthetic``)."""
    num_workers: NonNegativeInt = 0
    """DataLoader worker processes per rank (0: read in the training process)."""
    streams_per_rank: PositiveInt | None = None
    """Independent sample streams per rank; batch ``i`` comes from stream ``i % streams``.
    Batch contents depend on this number, not on ``num_workers``, which must divide it.
    ``None``: ``max(1, num_workers)``."""
    samples_per_epoch: PositiveInt | None = None
    """Samples per rank per epoch when training (``None``: the split's size divided by the
    data-parallel size). Evaluation reads the first ``samples_per_epoch * dp_size`` samples
    of the split (``None``: all of them)."""
    shuffle_buffer: NonNegativeInt = 1000
    """Samples held by each stream's shuffle buffer when training (0 or 1: shard order only)."""
    normalize: bool = True
    """Subtract the training split's mean and divide by its std (recorded in ``index.json``)."""
    worker_start_method: Literal["fork", "forkserver", "spawn"] | None = None
    """How DataLoader workers start (``None``: the process default, which is ``spawn``
    inside ranks started by ``torch.multiprocessing.spawn``; ``fork`` starts in milliseconds
    instead of seconds, and is safe here since workers never touch the GPU)."""
    pin_memory: bool = False
    prefetch_factor: PositiveInt = 2
    """Batches each worker prepares ahead."""
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.kind != "synthetic" and self.path is None:
            raise ValueError(f"data.path is required for kind={self.kind!r}: the directory with index.json")
        if self.num_workers and self.streams % self.num_workers:
            raise ValueError(
                f"data.num_workers={self.num_workers} must divide data.streams_per_rank={self.streams}: "
                "each worker serves whole streams so that batches keep their order"
            )
        return self

    @property
    def streams(self) -> int:
        """The number of sample streams per rank."""
        return self.streams_per_rank or max(1, self.num_workers)
