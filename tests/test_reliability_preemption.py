"""Preemption: SIGTERM (Kubernetes, SLURM, torchrun) or SIGINT reaching a rank mid-run stops every rank after the
same step with a checkpoint, marks the MLflow run KILLED, exits 128 + the signal, and the relaunch resumes there
bitwise. The signal is sent while the rank is held inside step 5 (``hang@step:5``), so the step it stops after is
known. SIGINT and SIGTERM to one rank of two run with ``--run-slow`` (the default suite keeps to its time)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from reliability.harness import (
    assert_identical,
    dcp_state,
    launch_cmd,
    lines_with,
    processes_of,
    reap,
    run,
    start,
    train_cmd,
    write_config,
)
from training.checkpoint.store import verify

pytestmark = pytest.mark.multiprocess  # every test here starts processes

TRAIN = {"steps": 8, "checkpoint_every": 100}  # no periodic checkpoint: only the one the signal asks for
FSDP = {"engine": "fsdp", "dp_shard": -1}
FINAL = "checkpoints/step_00000008"
HELD = "hang@step:5:seconds:6"


def _wait_for_line(log: Path, text: str, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, f"no '{text}' in {log}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("reference")
    run(train_cmd(write_config(directory, "reference", train=TRAIN)))
    return directory / "runs" / "reference"


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_relaunch_resumes_bitwise(reference, tmp_path,
                                                                                            signum):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path, "preempted", train=TRAIN, tracking={"enabled": True, "uri": uri})
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = start(train_cmd(config), fault=HELD, stdout=out, stderr=out)
        _wait_for_line(log, "TRANSLUTION_FAULT: hang at step 5", proc)
        proc.send_signal(signum)
        proc.wait(timeout=120)
    reap(proc.marker, "left behind")
    text = log.read_text()
    assert proc.returncode == 128 + signum, text[-3000:]
    name = signal.Signals(signum).name
    assert lines_with(text, f"rank 0: {name}: stopping after step 5 with a checkpoint")
    assert "Traceback" not in text
    run_dir = tmp_path / "runs" / "preempted"
    assert verify(run_dir / "checkpoints" / "step_00000005") is None
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "KILLED"

    relaunch = run(train_cmd(config))
    assert lines_with(relaunch.stderr, "resumed from", "step_00000005")
    assert_identical(dcp_state(reference / FINAL, tmp_path), dcp_state(run_dir / FINAL, tmp_path))
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("target", [pytest.param("rank 0 only", marks=pytest.mark.slow), "torchrun",
                                    pytest.param("torchrun SIGTERM", marks=pytest.mark.slow)])
def test_a_stop_signal_stops_both_ranks_at_the_same_step(tmp_path, target):
    """torchrun, 2 ranks: rank 1 is held in step 5 and rank 0 waits for it. The signal goes to rank 0 alone, or to
    torchrun: SIGUSR1 (SLURM's early warning, ``#SBATCH --signal=USR1@120``) or SIGTERM (what Kubernetes sends the
    container's first process); torchrun forwards it to both ranks and `launch` exits 128 + the signal, a status
    that Kubernetes' ``ExitCode`` restart policy retries, with one line instead of torchrun's traceback."""
    signum = signal.SIGUSR1 if target == "torchrun" else signal.SIGTERM
    config = write_config(tmp_path, "one-rank", train=TRAIN, parallel=FSDP)
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = start(launch_cmd(config, nproc=2), fault=HELD + ":rank:1", stdout=out, stderr=out)
        _wait_for_line(log, "TRANSLUTION_FAULT: hang at step 5 on rank 1", proc)
        if target.startswith("torchrun"):
            proc.send_signal(signum)  # launch execs torchrun: the same process
        else:
            [rank0] = [p for p in processes_of(proc.marker) if p.environ().get("RANK") == "0"
                       and "train" in p.cmdline()]
            rank0.send_signal(signum)
        proc.wait(timeout=180)
    reap(proc.marker, "left behind")
    text = log.read_text()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert lines_with(text, f"translution launch: {name}: the ranks checkpointed and stopped")
    for rank in (0, 1):
        assert lines_with(text, f"rank {rank}: {name}: stopping after step 5 with a checkpoint"), text[-3000:]
    checkpoint = tmp_path / "runs" / "one-rank" / "checkpoints" / "step_00000005"
    assert verify(checkpoint) is None

    relaunch = run(launch_cmd(config, nproc=2))  # bitwise resumption is the one-process test's (and the kills')
    assert lines_with(relaunch.stderr, "resumed from", "step_00000005")
    assert verify(tmp_path / "runs" / "one-rank" / FINAL) is None


def test_sigterm_during_evaluation_stops_there_with_a_checkpoint(reference, tmp_path):
    """A signal is honoured between evaluation batches, not only between steps: held in the first batch of the
    evaluation after step 4, the run stops there (not after step 5), checkpointed, and the relaunch ends bitwise
    equal to an uninterrupted run."""
    eval_train = {**TRAIN, "eval_every": 4, "eval_batches": 3}
    config = write_config(tmp_path, "in-eval", train=eval_train)
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = start(train_cmd(config), fault="hang@eval:4:seconds:6", stdout=out, stderr=out)
        _wait_for_line(log, "TRANSLUTION_FAULT: hang at eval 4", proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    reap(proc.marker, "left behind")
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert lines_with(text, "rank 0: SIGTERM: stopping after step 4 with a checkpoint")
    run_dir = tmp_path / "runs" / "in-eval"
    assert verify(run_dir / "checkpoints" / "step_00000004") is None

    relaunch = run(train_cmd(config))
    assert lines_with(relaunch.stderr, "resumed from", "step_00000004")
    assert_identical(dcp_state(reference / FINAL, tmp_path), dcp_state(run_dir / FINAL, tmp_path))
