"""The data section of a training config.

Defaults make a small CPU run work with no files at all (synthetic data, no worker
processes); a real run sets ``kind`` and ``path`` to a directory written by
``translution data ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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
    """Where the samples come from and how they are read."""

    model_config = ConfigDict(extra="forbid")

    kind: DataKind = "synthetic"
    path: Path | None = None
    """Directory holding ``index.json`` and the shards (not used by ``synthetic``)."""
    num_workers: NonNegativeInt = 0
    """DataLoader worker processes per rank (0: read in the training process); batch ``i``
    is made by worker ``i % num_workers``, and batch contents do not depend on this number."""
    samples_per_epoch: PositiveInt | None = None
    """Samples per rank per epoch when training (``None``: the whole split, over all ranks):
    an epoch's global order holds ``samples_per_epoch * dp_size`` samples, continuing into a
    fresh permutation of the split when that is more. The length is fixed when the epoch
    starts and kept when a run resumes under another data-parallel size. Evaluation reads the
    first ``samples_per_epoch * dp_size`` samples of the split (``None``: all of them)."""
    shuffle_buffer: NonNegativeInt = 1000
    """Training shuffles the samples inside consecutive windows of this many positions of the
    shard order, seeded by (seed, epoch, window) alone (0 or 1: shard order only)."""
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

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        """Refuse ``streams_per_rank``; its ``null`` default, in configs dumped by earlier versions
        (checkpoints, rendered manifests), meant nothing and is dropped."""
        if not isinstance(data, dict) or "streams_per_rank" not in data:
            return data
        if data["streams_per_rank"] is not None:
            raise ValueError(
                "data.streams_per_rank is no longer a setting: every rank cuts its batches from one global "
                "sample order, so batches do not depend on streams or workers; delete the line"
            )
        return {k: v for k, v in data.items() if k != "streams_per_rank"}

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.kind != "synthetic" and self.path is None:
            raise ValueError(f"data.path is required for kind={self.kind!r}: the directory with index.json")
        return self
