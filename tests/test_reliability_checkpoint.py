"""Checkpoint faults: a crash mid-write, files truncated or corrupted on disk, and a full disk.

Every run here has the same config (10 steps, a checkpoint every 2), so each damaged run ends
compared bit for bit (model and optimizer) with the module's uninterrupted reference.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from reliability.harness import (
    assert_identical,
    dcp_state,
    env,
    launch_cmd,
    lines_with,
    remount,
    run,
    tmpfs,
    train_cmd,
    write_config,
)
from training.checkpoint.store import CheckpointManager, verify

STEPS = 10
TRAIN = {"steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 5}
FINAL = f"checkpoints/step_{STEPS:08d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    run(train_cmd(write_config(directory, "reference", train=TRAIN)))
    return directory / "runs" / "reference"


# -- what verify() catches, in process ------------------------------------------------------


def _two_checkpoints(root):
    manager = CheckpointManager(root, keep=5, rank=0, world_size=1)
    for step in (2, 4):
        state = {"w": torch.full((64, 64), float(step))}
        manager.save(step, partial(_save_dcp, state), {"rng": step}, {})
    return manager


def _save_dcp(state, directory) -> None:
    dcp.save(state, checkpoint_id=str(directory / "dcp"))


def _shard(checkpoint):
    return next((checkpoint / "dcp").glob("*.distcp"))


DAMAGE = {
    "shard truncated": (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:100]), "checksum mismatch"),
    "one byte flipped": (lambda c: _flip(_shard(c)), "checksum mismatch"),
    "rank file deleted": (lambda c: (c / "rank_0.pt").unlink(), "missing file rank_0.pt"),
    "marker missing": (lambda c: (c / "COMPLETE.json").unlink(), "no completion marker"),
    "marker garbled": (lambda c: (c / "COMPLETE.json").write_text("{\"files\": "), "unreadable completion marker"),
}


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_never_loaded(tmp_path, caplog, damage):
    manager = _two_checkpoints(tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "step_00000004"
    harm, reason = DAMAGE[damage]
    harm(newest)
    assert reason in verify(newest)
    with caplog.at_level(logging.WARNING):
        assert manager.latest_good() == tmp_path / "checkpoints" / "step_00000002"
    assert any("skipping checkpoint" in r.message and reason in r.message for r in caplog.records)


# -- a real run killed while writing, then damaged on disk ------------------------------------


@pytest.mark.multiprocess
def test_crash_mid_write_and_damaged_checkpoints_fall_back_to_a_good_one(reference, tmp_path):
    config = write_config(tmp_path, "crashed", train=TRAIN)
    killed = run(train_cmd(config), fault="kill@checkpoint:8", expect=-signal.SIGKILL)
    checkpoints = tmp_path / "runs" / "crashed" / "checkpoints"
    assert lines_with(killed.stderr, "TRANSLUTION_FAULT: kill at checkpoint 8")
    partial = checkpoints / ".step_00000008.tmp"
    assert partial.is_dir() and not (partial / "COMPLETE.json").exists()
    shard = _shard(checkpoints / "step_00000006")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    _flip(checkpoints / "step_00000004" / "rank_0.pt")  # corrupted

    log = run(train_cmd(config)).stderr

    assert lines_with(log, "removing", ".step_00000008.tmp", "did not complete")
    assert lines_with(log, "skipping checkpoint", "step_00000006", "checksum mismatch in dcp/")
    assert lines_with(log, "skipping checkpoint", "step_00000004", "checksum mismatch in rank_0.pt")
    assert lines_with(log, "resumed from", "step_00000002")
    assert not partial.exists()
    assert_identical(dcp_state(reference / FINAL, tmp_path), dcp_state(tmp_path / "runs" / "crashed" / FINAL, tmp_path))


@pytest.mark.multiprocess
def test_async_checkpoint_is_complete_once_written_not_when_the_next_one_starts(tmp_path):
    """Step 4's asynchronous save finishes during a 3 s stall at step 6; a kill at step 7 keeps it."""
    config = write_config(tmp_path, "async", train={"steps": 8, "checkpoint_every": 4, "async_checkpoint": True},
                          parallel={"engine": "fsdp", "dp_shard": -1})
    killed = run(launch_cmd(config, nproc=2), fault="hang@step:6:seconds:3,kill@step:7", expect=None)
    assert killed.returncode != 0 and lines_with(killed.stderr, "TRANSLUTION_FAULT: kill at step 7")
    checkpoints = tmp_path / "runs" / "async" / "checkpoints"
    assert verify(checkpoints / "step_00000004") is None  # complete: marker written, checksums match

    log = run(launch_cmd(config, nproc=2)).stderr
    assert lines_with(log, "resumed from", "step_00000004")


# -- a full disk --------------------------------------------------------------------------------

# One checkpoint of the tiny model is about 0.5 MB: 800k holds the first, not the second.
SMALL, LARGE = "800k", "16m"


@pytest.mark.multiprocess
def test_disk_full_stops_the_run_and_keeps_the_previous_checkpoint(reference, tmp_path):
    with tmpfs(tmp_path / "disk", SMALL) as disk:
        config = write_config(tmp_path, "full", run={"output_dir": str(disk)}, train=TRAIN)
        failed = run(train_cmd(config), expect=1)
        checkpoints = disk / "full" / "checkpoints"
        assert lines_with(failed.stderr, "ERROR", "writing checkpoint step 4 failed", "bytes free under",
                          "the previous complete checkpoint (step_00000002) is intact", "stopping")
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]  # the partial write is removed
        assert verify(checkpoints / "step_00000002") is None

        remount(disk, f"size={LARGE}")  # space again: the run resumes from the intact checkpoint
        log = run(train_cmd(config)).stderr
        assert lines_with(log, "resumed from", "step_00000002")
        assert_identical(dcp_state(reference / FINAL, tmp_path), dcp_state(disk / "full" / FINAL, tmp_path))


@pytest.mark.multiprocess
def test_disk_full_at_the_model_export_leaves_no_partial_file(tmp_path):
    """The run's ``artifacts/`` on a 64 KiB tmpfs: the loss curves (≈ 90 KB) do not fit. The run ends with one
    line naming the directory and the command that exports the model from the complete final checkpoint."""
    config = write_config(tmp_path, "export", train={"steps": 2}, tracking={"enabled": True, "system_metrics": False})
    run_dir = tmp_path / "runs" / "export"
    with tmpfs(run_dir / "artifacts", "64k") as artifacts:
        failed = run(train_cmd(config), expect=1)
        assert lines_with(failed.stderr, "translution train: error: writing the run's artifacts under", "No space left",
                          "no partial file was left", f"translution ckpt export {run_dir} --out model.safetensors")
        assert "Traceback" not in failed.stderr, failed.stderr
        assert list(artifacts.iterdir()) == []  # before: a 64 KiB curves.png cut short
    out = tmp_path / "model.safetensors"
    run([sys.executable, "-m", "launcher.cli", "ckpt", "export", str(run_dir), "--out", str(out)])
    assert "cls_token" in load_file(out)


@pytest.mark.multiprocess
def test_disk_full_with_continue_trains_on(reference, tmp_path):
    """``train.on_checkpoint_error=continue``: the failed checkpoint is reported, training goes on, and the
    next checkpoints succeed once there is space (made while step 5 is held back by a 15 s hang)."""
    with tmpfs(tmp_path / "disk", SMALL) as disk:
        config = write_config(tmp_path, "full", run={"output_dir": str(disk)},
                              train={**TRAIN, "on_checkpoint_error": "continue"})
        proc = subprocess.Popen(train_cmd(config), env=env(TRANSLUTION_FAULT="hang@step:5:seconds:15"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "training goes on as train.on_checkpoint_error=continue" in line:
                remount(disk, f"size={LARGE}")
        assert proc.wait(timeout=300) == 0, "".join(seen)[-4000:]
        log = "".join(seen)
        assert lines_with(log, "writing checkpoint step 4 failed", "bytes free under", "training goes on")
        checkpoints = disk / "full" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == [f"step_{s:08d}" for s in (2, 6, 8, 10)]
        assert_identical(dcp_state(reference / FINAL, tmp_path), dcp_state(disk / "full" / FINAL, tmp_path))
        meta = json.loads((checkpoints / f"step_{STEPS:08d}" / "meta.json").read_text())
        assert meta["step"] == STEPS
    shutil.rmtree(tmp_path / "disk", ignore_errors=True)
