"""Rank faults under ``translution launch``: a worker SIGKILLed several times, and a changed world size or layout.

Both start from one uninterrupted 2-rank FSDP2 run (the module's reference), so the killed run
is compared with it bit for bit, and its checkpoints are what the elastic restarts reshard. Runs
record the samples they consume (``TRANSLUTION_DATA_TRACE``), so the elastic restarts are checked
against the global sample order.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import shutil
import time

import psutil
import pytest
from safetensors.torch import load_file

from reliability.harness import (
    assert_identical,
    dcp_state,
    launch_cmd,
    lines_with,
    processes_of,
    reap,
    run,
    start,
    wait_for_file,
    write_config,
)
from translution_dist.data.order import EpochOrder

pytestmark = pytest.mark.multiprocess  # every test here starts processes

STEPS = 48
EVERY = 4
TRACE = "TRANSLUTION_DATA_TRACE"
SECTIONS = {"parallel": {"engine": "fsdp", "dp_shard": -1},
            "train": {"steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": STEPS,
                      "collective_timeout_s": 60}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run, tracked (for the exported model), checkpointing every 4 steps."""
    directory = tmp_path_factory.mktemp("ranks")
    config = write_config(directory, "reference", **SECTIONS, tracking={"enabled": True})
    run(launch_cmd(config, nproc=2), **{TRACE: str(directory / "trace-reference")})
    return directory


def _resume_steps(stderr: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", stderr)]


def _worker(marker: str, rank: int, timeout: float = 120) -> psutil.Process:
    """The training process of ``rank`` in the job marked ``marker`` (it changes at every torchrun restart)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in processes_of(marker):
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("RANK") == str(rank) and "train" in proc.cmdline():
                    return proc
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} within {timeout}s")


def test_worker_sigkilled_three_times_resumes_bitwise(reference):
    """SIGKILL a random rank shortly after three randomly chosen checkpoints, from outside, as the OOM killer would."""
    seed = int(time.time())
    rng = random.Random(seed)
    after = sorted(rng.sample(range(2 * EVERY, STEPS - 3 * EVERY + 1, 2 * EVERY), 3))
    plan = [(step, rng.randrange(2), rng.uniform(0.0, 0.3)) for step in after]
    config = write_config(reference, "killed", **SECTIONS, tracking={"enabled": True})
    log_path = reference / "killed.log"
    with log_path.open("w") as log:
        proc = start(launch_cmd(config, nproc=2, max_restarts=len(plan)), stdout=log, stderr=log)
        try:
            for step, rank, delay in plan:
                wait_for_file(reference / "runs" / "killed" / "checkpoints" / f"step_{step:08d}" / "COMPLETE.json", proc)
                time.sleep(delay)
                _worker(proc.marker, rank).kill()
            assert proc.wait(timeout=400) == 0, log_path.read_text()[-6000:]
        finally:
            reap(proc.marker, "killed-run")
    stderr = log_path.read_text()
    context = f"seed {seed}, kills (after checkpoint, rank, delay s): {plan}"
    assert "connectFullMesh failed" not in stderr, context
    resumed = _resume_steps(stderr)
    assert all(any(a <= r <= a + EVERY for r in resumed) for a in after), f"{context}; resumed at {resumed}"

    straight, killed = reference / "runs" / "reference", reference / "runs" / "killed"
    a = load_file(straight / "artifacts" / "model.safetensors")
    b = load_file(killed / "artifacts" / "model.safetensors")
    assert_identical(a, b)
    final = f"checkpoints/step_{STEPS:08d}"
    assert_identical(dcp_state(straight / final, reference), dcp_state(killed / final, reference))

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{reference / 'mlflow.db'}")
    run_id = (killed / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run_id, "loss")} == set(range(1, STEPS + 1)), context


def _launch(config, *overrides, nproc):
    trace = config.parent / "trace-elastic"
    return run(launch_cmd(config, *overrides, nproc=nproc), timeout=300, **{TRACE: str(trace)}).stderr


def _consumed(trace_dir, epoch: int, before: int | None = None) -> list[int]:
    """Sample ids a run consumed in ``epoch`` (up to sample ``before``), in the global order the trace lines give:
    ``epoch first dp_rank ids…`` per batch and rank; tensor-parallel peers write the same line."""
    lines = {line for path in trace_dir.glob("trace-*.txt") for line in path.read_text().splitlines()}
    batches = sorted(tuple(map(int, line.split())) for line in lines)
    return [i for e, first, _, *ids in batches if e == epoch and (before is None or first < before) for i in ids]


def test_world_size_change_reshards_and_goes_on(reference, tmp_path):
    """2 → 1 → 2 ranks, then dp_shard=2 → tp=2: each restart at a new world size first re-saves the step it resumed
    (bitwise the same model and optimizer state as the checkpoint it read), then trains on; the data position
    carries over exactly: the samples consumed are the global order's first ones, none twice, none left out."""
    config = write_config(reference, "elastic", **SECTIONS)
    checkpoints = reference / "runs" / "elastic" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(reference / "runs" / "reference" / "checkpoints" / "step_00000004", checkpoints / "step_00000004")
    written_by_two = dcp_state(checkpoints / "step_00000004", tmp_path)

    log = _launch(config, "train.steps=4", nproc=1)  # 2 → 1
    assert lines_with(log, "written at world size 2, now 1", "resharded",
                      "the data resumes at sample 64 of 256 in epoch 0") and _resume_steps(log) == [4]
    assert_identical(dcp_state(checkpoints / "step_00000004", tmp_path), written_by_two)

    log = _launch(config, "train.steps=6", nproc=1)  # goes on at 1: 2 steps of 8 samples
    assert _resume_steps(log) == [4] and not lines_with(log, "resharded")
    shutil.copytree(checkpoints / "step_00000006", tmp_path / "step_00000006")
    written_by_one = dcp_state(tmp_path / "step_00000006", tmp_path)

    log = _launch(config, "train.steps=6", nproc=2)  # 1 → 2
    assert lines_with(log, "written at world size 1, now 2", "resharded",
                      "the data resumes at sample 80 of 256 in epoch 0") and _resume_steps(log) == [6]
    assert_identical(dcp_state(checkpoints / "step_00000006", tmp_path), written_by_one)

    log = _launch(config, "train.steps=8", nproc=2)  # goes on at 2: 2 steps of 16 samples
    assert _resume_steps(log) == [6] and (checkpoints / "step_00000008" / "COMPLETE.json").is_file()
    losses = [float(x) for x in re.findall(r"done: step 8, loss ([0-9.]+)", log)]
    assert losses and all(math.isfinite(x) for x in losses), log[-2000:]

    log = _launch(config, "train.steps=10", "parallel.dp_shard=1", "parallel.tp=2", nproc=2)  # layout: dp 2 → 1
    assert lines_with(log, "resumed from", "at step 8, data at sample 112 of 256 in epoch 0")

    consumed = _consumed(reference / "trace-reference", 0, before=64) + _consumed(reference / "trace-elastic", 0)
    order = EpochOrder([32] * 8, seed=0, epoch=0, shuffle=True, shuffle_buffer=1000)  # write_config's data
    assert consumed == order.ids(0, 128) and len(set(consumed)) == 128
