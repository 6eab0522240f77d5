"""Shard sources: read a range of samples from one shard, skipping (and counting) bad shards.

``TarSource`` reads webdataset tars written by the builders; ``SyntheticSource`` makes
deterministic random samples in virtual shards, so tests and benchmarks run the same
sharding plan without files.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from translution_dist.data.config import DataConfig, SyntheticConfig
from translution_dist.data.decode import Decoder, decoder_for, synthetic_decoder
from translution_dist.data.shards import load_index

log = logging.getLogger(__name__)

SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError, zlib.error)
"""What a missing, truncated or corrupt tar raises while it is read."""


@dataclass
class Counters:
    """Shards and samples a reader had to skip (a shard counts once per failed read)."""

    skipped_shards: int = 0
    skipped_samples: int = 0


class Source(Protocol):
    counts: list[int]
    digest: str

    def read(self, shard: int, start: int, stop: int, counters: Counters) -> Iterator[dict[str, Any]]: ...


class TarSource:
    """The shards of one split of a built data set."""

    def __init__(self, directory: Path, shards: list[dict[str, Any]]) -> None:
        self.files = [Path(directory) / s["file"] for s in shards]
        self.counts = [s["samples"] for s in shards]
        self.digest = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()

    def read(self, shard: int, start: int, stop: int, counters: Counters) -> Iterator[dict[str, Any]]:
        """Samples ``start..stop-1`` of a shard; a shard that fails or ends early is counted."""
        seen = 0
        try:
            with open(self.files[shard], "rb") as stream:
                members = tar_file_expander([{"url": str(self.files[shard]), "stream": stream}])
                for sample in group_by_keys(members):
                    if seen >= start:
                        yield sample
                    seen += 1
                    if seen == stop:
                        return
            problem = f"has {seen} samples, index.json says {self.counts[shard]}"
        except SHARD_ERRORS as exc:
            problem = f"is unreadable after {seen} samples ({type(exc).__name__}: {exc})"
        lost = stop - max(start, seen)
        counters.skipped_shards += 1
        counters.skipped_samples += lost
        log.warning("skipping shard %s: it %s; %d samples lost", self.files[shard], problem, lost)


class SyntheticSource:
    """Deterministic random samples of the configured shapes, in virtual shards."""

    def __init__(self, cfg: SyntheticConfig, split: str) -> None:
        self.cfg = cfg
        self.split_seed = zlib.crc32(split.encode())
        full, rest = divmod(cfg.samples, cfg.samples_per_shard)
        self.counts = [cfg.samples_per_shard] * full + ([rest] if rest else [])
        self.digest = hashlib.sha256(f"{cfg.model_dump_json()}:{split}".encode()).hexdigest()

    def read(self, shard: int, start: int, stop: int, counters: Counters) -> Iterator[dict[str, Any]]:
        for i in range(start, stop):
            rng = np.random.default_rng([self.split_seed, shard * self.cfg.samples_per_shard + i])
            cfg = self.cfg
            if cfg.task == "text":
                tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, cfg.context_length + 1))
                yield {"x": tokens[:-1], "y": tokens[1:]}
            else:
                shape = (cfg.channels, cfg.image_size, cfg.image_size)
                x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
                yield {"x": x, "y": torch.tensor(int(rng.integers(cfg.num_classes)))}


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data: shapes and label space."""

    kind: str
    input_shape: tuple[int, ...]
    """One sample's input: ``(C, S, S)`` for images, ``(T,)`` for text."""
    num_classes: int | None
    vocab_size: int | None
    split_samples: dict[str, int]


def open_source(cfg: DataConfig, split: str) -> tuple[Source, Decoder, DataInfo]:
    """The source, decoder and description of one split of the configured data."""
    if cfg.kind == "synthetic":
        syn = cfg.synthetic
        text = syn.task == "text"
        info = DataInfo(
            kind="synthetic",
            input_shape=(syn.context_length,) if text else (syn.channels, syn.image_size, syn.image_size),
            num_classes=None if text else syn.num_classes,
            vocab_size=syn.vocab_size if text else None,
            split_samples={split: syn.samples},
        )
        return SyntheticSource(syn, split), synthetic_decoder, info
    assert cfg.path is not None  # DataConfig requires it for every other kind
    index = load_index(cfg.path)
    if index["kind"] != cfg.kind:
        raise ValueError(f"data.kind is {cfg.kind!r} but {cfg.path} holds {index['kind']!r} shards")
    if split not in index["splits"] or not index["splits"][split]["shards"]:
        available = [s for s, e in index["splits"].items() if e["shards"]]
        raise ValueError(f"{cfg.path} has no shards for split {split!r}; it has {available}")
    if index["kind"] == "text":
        shape: tuple[int, ...] = (index["text"]["context_length"],)
        classes, vocab = None, index["text"]["vocab_size"]
    else:
        image = index["image"]
        shape = (len(image["mean"]), image["size"], image["size"])
        classes, vocab = index["num_classes"], None
    info = DataInfo(
        kind=index["kind"],
        input_shape=shape,
        num_classes=classes,
        vocab_size=vocab,
        split_samples={s: e["samples"] for s, e in index["splits"].items()},
    )
    source = TarSource(cfg.path, index["splits"][split]["shards"])
    return source, decoder_for(index, normalize=cfg.normalize), info
