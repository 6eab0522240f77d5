"""Shard sources: any sample of a split by (shard, index), counting damaged shards.

``TarSource`` reads the webdataset tars written by the builders by position: the first time a
process touches a shard it scans the tar's headers once (member names and data offsets, no data
read) and then reads a sample's members with one seek. A shard that ends early or is damaged is
indexed up to the damage; the samples past it are unreadable (``None``). ``SyntheticSource`` makes
deterministic random samples in virtual shards, so tests and benchmarks read the same order without
files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tarfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from translution_dist.data.config import DataConfig, SyntheticConfig
from translution_dist.data.decode import Decoder, decoder_for, synthetic_decoder
from translution_dist.data.shards import load_index

log = logging.getLogger(__name__)

SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError, zlib.error)
"""What a missing, truncated or corrupt tar raises while it is read."""

_META = re.compile(r"__[^/]*__($|/)")
"""Members webdataset's reader skips (``__meta__`` files)."""

_INDEXED_SHARDS = 16
"""Shard indexes a process keeps (the order reads shards a window at a time)."""


@dataclass
class Counters:
    """Shards found damaged (once per process that indexes one) and samples that could not be used."""

    skipped_shards: int = 0
    skipped_samples: int = 0


class Source(Protocol):
    counts: list[int]
    digest: str

    def get(self, shard: int, index: int, counters: Counters) -> dict[str, Any] | None:
        """Sample ``index`` of ``shard``, or ``None`` when it cannot be read."""
        ...


Member = tuple[str, int, int]
"""A sample's member: ``(suffix, data offset, size)``."""


def index_tar(path: Path) -> tuple[list[tuple[str, list[Member]]], str | None]:
    """The samples of a tar as webdataset groups them (consecutive members sharing a key), and what cut it short."""
    samples: list[tuple[str, list[Member]]] = []
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isreg() or _META.match(info.name):
                    continue
                if info.offset_data + info.size > size:
                    return samples, f"ends inside {info.name}"
                key, suffix = base_plus_ext(info.name)
                if key is None:
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, []))
                samples[-1][1].append((suffix.lower(), info.offset_data, info.size))
    except SHARD_ERRORS as exc:
        return samples, f"is unreadable after {len(samples)} samples ({type(exc).__name__}: {exc})"
    return samples, None


class TarSource:
    """The shards of one split of a built data set."""

    def __init__(self, directory: Path, shards: list[dict[str, Any]]) -> None:
        self.files = [Path(directory) / s["file"] for s in shards]
        self.counts = [s["samples"] for s in shards]
        self.digest = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
        self._indexes: OrderedDict[int, list[tuple[str, list[Member]]]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_indexes": OrderedDict()}  # each DataLoader worker indexes what it reads

    def get(self, shard: int, index: int, counters: Counters) -> dict[str, Any] | None:
        samples = self._index(shard, counters)
        if index >= len(samples):
            return None  # past the damage, reported when the shard was indexed
        key, members = samples[index]
        start, stop = members[0][1], members[-1][1] + members[-1][2]
        try:
            with open(self.files[shard], "rb") as stream:
                stream.seek(start)
                blob = stream.read(stop - start)
        except OSError as exc:
            log.warning("skipping sample %s of %s: %s", key, self.files[shard], exc)
            return None
        if len(blob) != stop - start:
            log.warning("skipping sample %s: %s is shorter than when it was indexed", key, self.files[shard])
            return None
        sample: dict[str, Any] = {"__key__": key, "__url__": str(self.files[shard])}
        for suffix, offset, size in members:
            sample[suffix] = blob[offset - start : offset - start + size]
        return sample

    def _index(self, shard: int, counters: Counters) -> list[tuple[str, list[Member]]]:
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        samples, problem = index_tar(self.files[shard])
        expected = self.counts[shard]
        if problem is None and len(samples) != expected:
            problem = f"has {len(samples)} samples, index.json says {expected}"
        if problem is not None:
            counters.skipped_shards += 1
            log.warning("skipping shard %s: it %s; %d samples lost", self.files[shard], problem,
                        max(expected - len(samples), 0))
        self._indexes[shard] = samples
        if len(self._indexes) > _INDEXED_SHARDS:
            self._indexes.popitem(last=False)
        return samples


class SyntheticSource:
    """Deterministic random samples of the configured shapes, in virtual shards."""

    def __init__(self, cfg: SyntheticConfig, split: str) -> None:
        self.cfg = cfg
        self.split = split
        self.split_seed = zlib.crc32(split.encode())
        full, rest = divmod(cfg.samples, cfg.samples_per_shard)
        self.counts = [cfg.samples_per_shard] * full + ([rest] if rest else [])
        self.digest = hashlib.sha256(f"{cfg.model_dump_json()}:{split}".encode()).hexdigest()

    def get(self, shard: int, index: int, counters: Counters) -> dict[str, Any]:
        cfg, position = self.cfg, shard * self.cfg.samples_per_shard + index
        rng = np.random.default_rng([self.split_seed, position])
        sample: dict[str, Any] = {"__key__": f"{self.split}-{position:08d}"}
        if cfg.task == "text":
            tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, cfg.context_length + 1))
            return {**sample, "x": tokens[:-1], "y": tokens[1:]}
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        return {**sample, "x": x, "y": torch.tensor(int(rng.integers(cfg.num_classes)))}


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
