"""What a run records about where it came from: the code (git), the machine, and the data it read.

Computed on rank 0 when tracking starts, and again at every resume, since a resumed run may
run other code on other machines; nothing here may fail a run (an unknown is written as such).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

from training.tracking import DatasetRecord
from translution_dist.data.config import DataConfig
from translution_dist.data.shards import DATACARD_FILE, INDEX_FILE

log = logging.getLogger(__name__)

CODE_ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = {"train": "training", "test": "evaluation"}
"""MLflow's input context of each split the trainer reads."""
RUN_TOKENIZER = "tokenizer.json"
"""The text data's tokenizer, copied into the run directory: the run's token ids mean nothing without it."""


def _git(root: Path, *args: str) -> str | None:
    """``git ARGS`` in ``root``; ``None`` where git is missing, ``root`` is no repository, or git fails."""
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state(root: Path = CODE_ROOT) -> dict[str, str]:
    """``git_commit`` and ``git_dirty`` tags of the code in ``root`` (``unknown`` without git or a repository).

    Dirty means the working tree is not the commit: a tracked file changed, or a file git does not
    ignore was added (a new module changes the code as much as an edit does).
    """
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain") if commit else None
    if not commit or status is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": "true" if status else "false"}


def host_tags() -> dict[str, str]:
    return {"host": socket.gethostname()}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]  # MLflow keeps at most 36 characters


def dataset_records(data: DataConfig, splits: list[str]) -> list[DatasetRecord]:
    """One MLflow dataset per split read: named after the data directory and the split, digest of ``index.json``.

    Synthetic data has no files: its source is the generator's config, and the digest that config's.
    """
    if data.kind == "synthetic":
        config = data.synthetic.model_dump(mode="json")
        digest = _digest(json.dumps(config, sort_keys=True).encode())
        return [DatasetRecord(f"synthetic-{data.synthetic.task}/{split}", digest,
                              {"generator": "translution_dist.data.sources.SyntheticSource", "config": config},
                              CONTEXTS[split], {"samples": data.synthetic.samples, "split": split})
                for split in splits]
    assert data.path is not None  # DataConfig requires it for every other kind
    raw = (data.path / INDEX_FILE).read_bytes()
    index = json.loads(raw)
    records = []
    for split in splits:
        entry = index["splits"][split]
        profile = {"split": split, "samples": entry["samples"], "shards": entry["num_shards"], "kind": index["kind"],
                   "index_sha256": hashlib.sha256(raw).hexdigest(), "builder": index["builder"]["name"],
                   "splits": {name: e["samples"] for name, e in index["splits"].items()}}
        records.append(DatasetRecord(f"{data.path.resolve().name}/{split}", _digest(raw), str(data.path.resolve()),
                                     CONTEXTS[split], profile))
    return records


def data_files(data: DataConfig) -> list[Path]:
    """The data set's card and index, logged beside its inputs (none for synthetic data)."""
    if data.path is None:
        return []
    return [path for path in (data.path / DATACARD_FILE, data.path / INDEX_FILE) if path.is_file()]


def keep_tokenizer(data: DataConfig, run_dir: Path) -> None:
    """Copy a text data set's tokenizer into the run directory (replaced whole), for sampling and the model artifact."""
    if data.kind != "text" or data.path is None:
        return
    source = data.path / json.loads((data.path / INDEX_FILE).read_text())["text"]["tokenizer"]
    if not source.is_file():
        log.warning("%s is missing: the run's token ids cannot be turned into text by `translution generate`", source)
        return
    staged = run_dir / f".{RUN_TOKENIZER}.{os.getpid()}"
    shutil.copyfile(source, staged)
    os.replace(staged, run_dir / RUN_TOKENIZER)
