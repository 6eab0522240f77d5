"""A checkpoint's model weights as one consolidated safetensors file, offline.

The weights are read from the DCP checkpoint in batches of at most ``batch_bytes`` of
model tensors (never the optimizer state) and appended to the file as they arrive, so the
memory needed is one batch, not the model. Names are this project's state-dict names, or
the official Translution code's (``translution_dist.models.official``), where each
official tensor is built from the group of our tensors its rule names (a bank from all
of its chunks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from training.checkpoint.locate import (
    MODEL_PREFIX,
    CheckpointToolError,
    Located,
    config_hash,
    dcp_metadata,
    load_entries,
    model_config,
    model_entries,
)
from training.checkpoint.safetensors_file import TensorEntry, write_safetensors
from translution_dist.models.official import QueryProjection, official_rules, resolve_query_projection, to_official

BATCH_BYTES = 512 << 20
"""Model bytes read from the checkpoint at a time."""


@dataclass(frozen=True)
class _Group:
    """Checkpoint tensors ``inputs`` become file tensors ``outputs`` through ``convert``."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    convert: Callable[[list[Tensor]], list[Tensor]]


@dataclass(frozen=True)
class ExportResult:
    tensors: int
    bytes: int


def _same(tensors: list[Tensor]) -> list[Tensor]:
    return tensors


def _official_plan(located: Located, shapes: dict[str, tuple[torch.Size, torch.dtype]], arch: str,
                   query_projection: QueryProjection | None) -> tuple[list[_Group], dict, QueryProjection]:
    cfg = model_config(located)
    if cfg.arch != arch:
        raise CheckpointToolError(f"--official {arch}: the checkpoint holds a {cfg.arch} model; "
                                  f"use --official {cfg.arch}")
    try:
        query_projection = resolve_query_projection(cfg, query_projection)
        rules = official_rules(cfg, query_projection)
        with torch.device("meta"):  # checks every key and shape against the config; converts shapes only
            converted = to_official({n: torch.empty(s, dtype=d) for n, (s, d) in shapes.items()}, cfg,
                                    query_projection=query_projection)
    except ValueError as err:  # OfficialWeightsError among them
        raise CheckpointToolError(f"cannot export official names: {err}") from err
    groups = [_Group(rule.ours, rule.official, rule.to_official) for rule in rules]
    return groups, {name: (t.shape, t.dtype) for name, t in converted.items()}, query_projection


def _batches(groups: list[_Group], sizes: dict[str, int], budget: int) -> Iterator[list[_Group]]:
    batch: list[_Group] = []
    used = 0
    for group in groups:
        need = sum(sizes[name] for name in group.inputs)
        if batch and used + need > budget:
            yield batch
            batch, used = [], 0
        batch.append(group)
        used += need
    if batch:
        yield batch


def check_target(out: Path) -> None:
    """Refuse an ``--out`` that cannot become the file, before any checkpoint is verified or read."""
    if out.is_dir():
        raise CheckpointToolError(f"--out {out} is a directory; give a file name such as {out / 'model.safetensors'}")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise CheckpointToolError(f"cannot write {out}: {out.parent} is not a writable directory")


def export(located: Located, out: Path, *, official: str | None = None,
           query_projection: QueryProjection | None = None, dtype: torch.dtype = torch.float32,
           batch_bytes: int = BATCH_BYTES) -> ExportResult:
    """Write the model weights of ``located`` to ``out`` (``official``: the arch whose official names to use).

    ``query_projection`` may be left out where the model exists in one official convention only.
    """
    check_target(out)
    metadata = dcp_metadata(located)
    entries = model_entries(metadata)
    if not entries:
        raise CheckpointToolError(f"{located.dcp_dir} holds no model tensors")
    shapes = {name: (md.size, md.properties.dtype) for name, md in entries.items()}
    if official:
        groups, out_shapes, query_projection = _official_plan(located, shapes, official, query_projection)
    else:
        groups, out_shapes = [_Group((name,), (name,), _same) for name in shapes], shapes

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    header = []
    for group in groups:
        for name in group.outputs:
            shape, dt = out_shapes[name]
            header.append(TensorEntry(name, tuple(shape), dtype if dt.is_floating_point else dt))
    sizes = {name: shape.numel() * dt.itemsize for name, (shape, dt) in shapes.items()}

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for batch in _batches(groups, sizes, batch_bytes):
            state = load_entries(located, metadata, [MODEL_PREFIX + n for g in batch for n in g.inputs])
            for group in batch:
                outputs = group.convert([state.pop(MODEL_PREFIX + n) for n in group.inputs])
                yield from ((name, cast(t)) for name, t in zip(group.outputs, outputs, strict=True))

    naming = f"official {official} (query_projection={query_projection})" if official else "translution_dist"
    metadata_strings = {"format": "pt", "step": str(located.step), "config_sha256": config_hash(located.meta),
                        "model_config": json.dumps(located.meta.get("config", {}).get("model")),
                        "naming": naming, "dtype": str(dtype).removeprefix("torch."), "source": str(located.path)}
    try:
        write_safetensors(out, header, tensors(), metadata_strings)
    except OSError as err:
        raise CheckpointToolError(f"exporting to {out} failed: {err.strerror or err}; nothing was written") from err
    return ExportResult(len(header), sum(entry.nbytes for entry in header))
