"""Offline access to this project's checkpoints, shared by ``translution ckpt inspect|export|reshard``.

Everything here runs in one process without a process group: paths are resolved to one
complete, verified ``step_XXXXXXXX`` directory (the newest good one of a run), its DCP
metadata is read without loading tensors, and tensors are loaded by name into plain
(unsharded) tensors; DCP assembles each from whatever shards the writing ranks held.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from training.checkpoint.store import MARKER, PREFIX, CheckpointManager, verify
from translution_dist.models import ModelConfig

MODEL_PREFIX = "model."
OPTIM_STATE_PREFIX = "optim.state."
BANK_PATTERN = re.compile(r"^(?P<family>.*\.(?:score_banks|value_banks))\.(?P<chunk>\d+)\.(?P<side>[qkv])\.weight$")
"""A bank chunk's parameter, e.g. ``encoder.blocks.0.attn.score_banks.2.q.weight``."""


class CheckpointToolError(ValueError):
    """A path or option the checkpoint tools cannot use; the message says why and what to do."""


@dataclass
class Located:
    """One complete checkpoint, and how it was chosen when a run or checkpoints directory was given."""

    path: Path
    meta: dict[str, Any]
    verified: bool
    chosen_from: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (directory name, why)

    @property
    def dcp_dir(self) -> Path:
        return self.path / "dcp"

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _checkpoints_root(path: Path) -> Path | None:
    """The ``checkpoints/`` directory ``path`` stands for, or ``None`` if it is a step directory."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.name.startswith(PREFIX) or (path / MARKER).exists() or (path / "meta.json").exists():
        return None
    if any(child.is_dir() and child.name.startswith(PREFIX) for child in path.iterdir()):
        return path
    raise CheckpointToolError(
        f"{path} is neither a run directory (with checkpoints/), a checkpoints directory nor a checkpoint "
        f"({PREFIX}XXXXXXXX/)")


def _problem(step_dir: Path, check_sums: bool) -> str | None:
    """Why ``step_dir`` may not be read, or ``None``; without ``check_sums`` only completeness counts."""
    if check_sums:
        problem = verify(step_dir)
    else:
        problem = None if (step_dir / MARKER).is_file() else "no completion marker (the write was interrupted)"
    if problem is None and not (step_dir / "dcp" / ".metadata").is_file():
        problem = "no DCP state (dcp/.metadata), which every engine's checkpoint holds"
    return problem


def read_meta(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((step_dir / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointToolError(f"{step_dir}: unreadable meta.json ({err})") from err


def locate(path: Path, verify_checksums: bool = True) -> Located:
    """The checkpoint ``path`` names: itself if a step directory, else the newest good one under it.

    A checkpoint that is incomplete, or (with ``verify_checksums``) whose files do not match
    their checksums, is refused when named and passed over (with the reason) when searching.
    """
    if not path.exists():
        raise CheckpointToolError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointToolError(f"{path} is a file; give a run directory, its checkpoints/ or a {PREFIX}XXXXXXXX/")
    root = _checkpoints_root(path)
    if root is None:
        problem = _problem(path, verify_checksums)
        if problem:
            raise CheckpointToolError(f"{path} cannot be read: {problem}; use another checkpoint of the run "
                                      "(give the run directory to pick the newest good one)")
        return Located(path, read_meta(path), verify_checksums)
    skipped = []
    for candidate in CheckpointManager(root, keep=1, rank=0, world_size=1).candidates():
        problem = _problem(candidate, verify_checksums)
        if problem is None:
            return Located(candidate, read_meta(candidate), verify_checksums, root, skipped)
        skipped.append((candidate.name, problem))
    reasons = "".join(f"\n  {name}: {why}" for name, why in skipped) or f" (no {PREFIX}XXXXXXXX directories)"
    raise CheckpointToolError(f"{root} holds no complete, verified checkpoint{reasons}")


def dcp_metadata(located: Located) -> Metadata:
    """The DCP index of the checkpoint: every entry's global shape and dtype, no tensor data."""
    try:
        return FileSystemReader(str(located.dcp_dir)).read_metadata()
    except Exception as err:  # unpickling a damaged index can raise anything
        raise CheckpointToolError(f"{located.dcp_dir}: unreadable DCP metadata ({err})") from err


def model_config(located: Located) -> ModelConfig:
    """The model the checkpoint was written for, from the resolved config in ``meta.json``."""
    try:
        return ModelConfig.model_validate(located.meta["config"]["model"])
    except (KeyError, ValueError) as err:
        raise CheckpointToolError(f"{located.path}/meta.json has no usable model config ({err})") from err


def config_hash(meta: dict[str, Any]) -> str:
    """SHA-256 of the resolved run config recorded in ``meta.json`` (key order does not matter)."""
    return hashlib.sha256(json.dumps(meta.get("config"), sort_keys=True).encode()).hexdigest()


def model_entries(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    """The model's tensors by state-dict name (without the ``model.`` prefix), in checkpoint order."""
    return {key.removeprefix(MODEL_PREFIX): md for key, md in metadata.state_dict_metadata.items()
            if key.startswith(MODEL_PREFIX) and isinstance(md, TensorStorageMetadata)}


@contextmanager
def single_process() -> Iterator[None]:
    """DCP without a process group warns that it assumes one process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_entries(located: Located, metadata: Metadata, keys: list[str]) -> dict[str, Any]:
    """The checkpoint entries ``keys`` (full DCP names) as plain CPU tensors / Python objects.

    Only the byte ranges of those entries are read, so loading the model's keys never
    touches the optimizer state.
    """
    entries = metadata.state_dict_metadata
    state: dict[str, Any] = {}
    for key in keys:
        md = entries[key]
        state[key] = torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
    if state:  # (a batch of official tensors may need none: the GPT's constant causal masks)
        with single_process():
            dcp.load(state, storage_reader=FileSystemReader(str(located.dcp_dir)), no_dist=True)
    return state

