"""Rank faults under ``translution launch``: a worker SIGKILLed several times, and a changed world size.

Both start from one uninterrupted 2-rank FSDP2 run (the module's reference), so the killed run
is compared with it bit for bit, and its checkpoints are what the elastic restarts reshard.
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

pytestmark = pytest.mark.multiprocess  # every test here starts processes

STEPS = 48
EVERY = 4
SECTIONS = {"parallel": {"engine": "fsdp", "dp_shard": -1},
            "train": {"steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": STEPS,
                      "collective_timeout_s": 60}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run, tracked (for the exported model), checkpointing every 4 steps."""
    directory = tmp_path_factory.mktemp("ranks")
    config = write_config(directory, "reference", **SECTIONS, tracking={"enabled": True})
    run(launch_cmd(config, nproc=2))
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
    return run(launch_cmd(config, *overrides, nproc=nproc), timeout=300).stderr


def test_world_size_change_reshards_and_goes_on(reference, tmp_path):
    """2 → 1 → 2 ranks: each restart at a new world size first re-saves the step it resumed (bitwise the same
    model and optimizer state as the checkpoint it read), then trains on."""
    config = write_config(reference, "elastic", **SECTIONS)
    checkpoints = reference / "runs" / "elastic" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(reference / "runs" / "reference" / "checkpoints" / "step_00000004", checkpoints / "step_00000004")
    written_by_two = dcp_state(checkpoints / "step_00000004", tmp_path)

    log = _launch(config, "train.steps=4", nproc=1)  # 2 → 1
    assert lines_with(log, "written at world size 2, now 1", "resharded") and _resume_steps(log) == [4]
    assert_identical(dcp_state(checkpoints / "step_00000004", tmp_path), written_by_two)

    log = _launch(config, "train.steps=6", nproc=1)  # goes on at 1
    assert _resume_steps(log) == [4] and not lines_with(log, "resharded")
    shutil.copytree(checkpoints / "step_00000006", tmp_path / "step_00000006")
    written_by_one = dcp_state(tmp_path / "step_00000006", tmp_path)

    log = _launch(config, "train.steps=6", nproc=2)  # 1 → 2
    assert lines_with(log, "written at world size 1, now 2", "resharded") and _resume_steps(log) == [6]
    assert_identical(dcp_state(checkpoints / "step_00000006", tmp_path), written_by_one)

    log = _launch(config, "train.steps=8", nproc=2)  # goes on at 2
    assert _resume_steps(log) == [6] and (checkpoints / "step_00000008" / "COMPLETE.json").is_file()
    losses = [float(x) for x in re.findall(r"done: step 8, loss ([0-9.]+)", log)]
    assert losses and all(math.isfinite(x) for x in losses), log[-2000:]
