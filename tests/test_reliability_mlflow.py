"""The MLflow server crashes mid-run and comes back on the same port and store: training goes on,
and every metric it logged meanwhile reaches the server."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import pytest

from reliability.harness import MlflowServer, lines_with, reap, start, train_cmd, wait_for_file, write_config

pytestmark = pytest.mark.multiprocess  # every test here starts processes

STEPS = 30


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.kill()


def test_server_down_then_restarted_loses_no_metric(tmp_path, server, caplog, monkeypatch):
    import mlflow

    from training.tracking import HTTP_DEFAULTS, Tracker

    for key, value in HTTP_DEFAULTS.items():  # what the probe tracker sets, undone after the test
        monkeypatch.setenv(key, value)

    config = write_config(tmp_path, "tracked", train={"steps": STEPS, "checkpoint_every": 10},
                          tracking={"enabled": True, "uri": server.uri, "experiment": "outage"})
    run_dir = tmp_path / "runs" / "tracked"
    log_path = tmp_path / "train.log"
    probe = Tracker(server.uri, "outage")
    probe.start("probe", {})
    with log_path.open("w") as log:
        proc = start(train_cmd(config), stdout=log, stderr=log)
        try:
            wait_for_file(run_dir / "mlflow_run_id", proc)
            server.kill()  # from here on every call fails: refused connections

            # the tracker queues instead of stalling (MLflow's client alone would retry for minutes)
            began = time.monotonic()
            probe.log_metrics({"x": 1.0}, step=1)
            assert time.monotonic() - began < 5 and probe.pending == 1
            with caplog.at_level(logging.ERROR):
                assert probe.finish(wait_s=1) == 2  # the metric and the end of the run: reported as lost
            assert any("could not be delivered" in r.message for r in caplog.records)

            # training goes on to its end with the server down, then waits in its final flush ...
            wait_for_file(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE.json", proc)
            os.kill(proc.pid, signal.SIGSTOP)  # ... held there while the server restarts (slowly, on 2 cores)
            server.start()
            os.kill(proc.pid, signal.SIGCONT)
            assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
        finally:
            reap(proc.marker, "tracked run")
    text = log_path.read_text()
    assert lines_with(text, "WARNING", "unreachable", "keeping")
    assert lines_with(text, "reachable again; queued calls delivered")
    assert not lines_with(text, "could not be delivered")

    client = mlflow.MlflowClient(tracking_uri=server.uri)
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "FINISHED"
    for metric in ("loss", "lr", "grad_norm"):
        assert [m.step for m in client.get_metric_history(run_id, metric)] == list(range(1, STEPS + 1)), metric
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}


# -- creating an embedded store ------------------------------------------------------------------

OPEN_A_RUN = ("import sys; from training.tracking import Tracker; "
              "t = Tracker(sys.argv[1], 'e'); t.start('r', {}); t.finish()")


def _open_a_run(uri: str):
    return start([sys.executable, "-c", OPEN_A_RUN, uri])


@pytest.mark.parametrize("kill_after_s", [1.5, 2.5, 3.5])
def test_a_store_killed_while_being_created_is_never_left_half_made(tmp_path, kill_after_s):
    """SIGKILL a run while it may be building the store's schema; the next run finds a usable store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _open_a_run(uri)
    time.sleep(kill_after_s)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    reap(first.marker, "killed creator")
    second = _open_a_run(uri)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-3000:]


def test_two_runs_creating_one_store_at_once_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [_open_a_run(uri) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errors)
    assert not list(tmp_path.glob(".mlflow.db.*"))  # no private file left behind
