"""Atomic, checksummed, sharded checkpoints.

A checkpoint is the directory ``step_XXXXXXXX`` under the run's ``checkpoints/``. It is
written as ``.step_XXXXXXXX.tmp``: the engine's sharded state (``dcp/``, one DCP layout
for every engine, so any engine and world size loads it), one ``rank_R.pt`` per rank (RNG
states, data position), ``meta.json`` (step, scheduler, layout), and last ``COMPLETE.json``, which
lists the SHA-256 of every file. Only then is it renamed into place. A directory without
a marker, or whose files do not match their checksums, is never loaded: the newest good
checkpoint is used instead and the user is told why the others were passed over.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


WRITE_ERRORS = (OSError, CheckpointException)
"""What a failed write raises: OSError (ENOSPC, EIO…) and DCP's CheckpointException, a BaseException
(so ``except Exception`` misses it) that gathers every rank's failure."""


def _describe(err: BaseException, directory: Path) -> str:
    """One line for a failed write, with the free space where it went.

    DCP's exception is a multi-rank traceback, so only each rank's cause is kept; and torch's
    writer reports a full disk as ``unexpected pos …``, so the free space says what the errno cannot.
    """
    if isinstance(err, CheckpointException):
        text = "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in err.failures.items())
    else:
        text = f"{type(err).__name__}: {err}"
    try:
        return f"{text} ({shutil.disk_usage(directory).free} bytes free under {directory})"
    except OSError:
        return text


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(path: Path) -> str | None:
    """``None`` if ``path`` is a complete checkpoint whose files match their checksums, else why not."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker (the write was interrupted)"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable completion marker ({err})"
    for name, expected in listed.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if _sha256(file) != expected:
            return f"checksum mismatch in {name} (corrupted on disk)"
    return None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Restored:
    step: int
    path: Path
    meta: dict[str, Any]
    rank_state: dict[str, Any] | None  # None when the checkpoint was written at another world size


SaveFn = Callable[[Path], "Future | None"]
LoadFn = Callable[[Path], None]


class CheckpointManager:
    """Writes, finds, verifies, loads and prunes the checkpoints of one run.

    The engine's sharded state goes through ``save_state(dir)``/``load_state(dir)``
    callables, so the same atomic protocol serves every engine.
    """

    def __init__(self, root: Path, keep: int, rank: int, world_size: int) -> None:
        self.root = root
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self._pending: tuple[Future, Path, int, dict] | None = None

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _broadcast(self, value: Any) -> Any:
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return value

    def _agree(self, error: str | None) -> str | None:
        """Every rank's error, on every rank: one rank's failed write must not leave the others in a collective."""
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            errors: list[str | None] = [None] * self.world_size
            dist.all_gather_object(errors, error)
            return "; ".join(f"rank {rank}: {e}" for rank, e in enumerate(errors) if e) or None
        return error

    def _fail(self, step: int, tmp: Path, error: str | None) -> None:
        """Raise ``error`` (the same on every rank) after rank 0 removed the partial checkpoint, freeing its space."""
        if error is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        complete = next((p.name for p in self.candidates() if (p / MARKER).is_file()), None)
        raise CheckpointError(f"writing checkpoint step {step} failed: {error}; the previous complete checkpoint "
                              f"({complete or 'none'}) is intact")

    # -- writing -------------------------------------------------------------------

    def save(self, step: int, save_state: SaveFn, rank_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write the checkpoint of ``step``; with an asynchronous ``save_state`` it completes later."""
        self.wait()
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        error = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as err:
                error = _describe(err, self.root)
        self._fail(step, tmp, self._broadcast(error))
        pending = None
        try:
            pending = save_state(tmp)
            _write_atomically(tmp / f"rank_{self.rank}.pt", _to_bytes({"rank_state": rank_state}))
        except WRITE_ERRORS as err:
            error = _describe(err, self.root)
        self._fail(step, tmp, self._agree(error))
        self._pending = (pending, tmp, step, meta) if pending is not None else None
        if pending is None:
            self._finalize(tmp, step, meta)

    def poll(self) -> None:
        """Complete an asynchronous save as soon as every rank's write is done.

        Called by every rank at each step boundary (a collective while a save is pending), so
        a fully written checkpoint is marked complete within a step of its last write, not
        only when the next checkpoint starts: a kill in between then costs nothing written.
        """
        if self._pending is not None and self._all_ranks(self._pending[0].done()):
            self.wait()

    def _all_ranks(self, flag: bool) -> bool:
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            flags: list[bool] = [False] * self.world_size
            dist.all_gather_object(flags, flag)
            return all(flags)
        return flag

    def wait(self) -> None:
        """Complete an asynchronous save that is still in flight."""
        if self._pending is None:
            return
        future, tmp, step, meta = self._pending
        self._pending = None
        error = None
        try:
            future.result()
        except WRITE_ERRORS as err:
            error = _describe(err, self.root)
        self._fail(step, tmp, self._agree(error))
        self._finalize(tmp, step, meta)

    def _finalize(self, tmp: Path, step: int, meta: dict[str, Any]) -> None:
        self._barrier()
        error = None
        if self.rank == 0:
            try:
                meta = {**meta, "step": step, "world_size": self.world_size}
                _write_atomically(tmp / "meta.json", json.dumps(meta, indent=2).encode())
                files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                _write_atomically(tmp / MARKER, json.dumps({"step": step, "files": files}, indent=1).encode())
                final = self.root / step_dir_name(step)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune()
            except OSError as err:
                error = _describe(err, self.root)
        self._fail(step, tmp, self._broadcast(error))

    def _prune(self) -> None:
        complete = [p for p in self.candidates() if (p / MARKER).is_file()]
        for old in complete[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    # -- reading -------------------------------------------------------------------

    def candidates(self) -> list[Path]:
        """Checkpoint directories, newest first (complete or not)."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
        return sorted(dirs, key=lambda p: p.name, reverse=True)

    def latest_good(self) -> Path | None:
        """The newest checkpoint that verifies; rank 0 checks and tells the others.

        Partial writes a crash left behind (``.step_*.tmp``) are never candidates; they are
        removed here, where nothing is being written, and the user is told.
        """
        choice = None
        if self.rank == 0:
            for partial in sorted(self.root.glob(f".{PREFIX}*.tmp")) if self.root.is_dir() else []:
                log.warning("removing %s: a checkpoint write that did not complete (the process died or the "
                            "disk filled); it was never loaded", partial)
                shutil.rmtree(partial, ignore_errors=True)
            for path in self.candidates():
                problem = verify(path)
                if problem is None:
                    choice = str(path)
                    break
                log.warning("skipping checkpoint %s: %s", path, problem)
        choice = self._broadcast(choice)
        return Path(choice) if choice else None

    def load(self, path: Path, load_state: LoadFn) -> Restored:
        meta = json.loads((path / "meta.json").read_text())
        load_state(path)
        rank_state = None
        if meta.get("world_size") == self.world_size:
            rank_state = torch.load(path / f"rank_{self.rank}.pt", weights_only=False)["rank_state"]
        return Restored(step=int(meta["step"]), path=path, meta=meta, rank_state=rank_state)


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
