"""Training end to end: exact resume, a real kill of a 2-process run, resharding, MLflow read back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers.processes import prepare_deepspeed_on_cpu
from translution_dist.models import ModelConfig
from translution_dist.models.flops import model_flops_per_sample

pytestmark = pytest.mark.multiprocess  # every test here starts processes

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"arch": "vit", "attention": "alpha", "dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "mlp_dim": 32,
         "alpha_rank": 2, "image_size": 12, "patch_size": 4, "channels": 1, "num_classes": 10}


def _config(tmp_path: Path, name: str, **sections) -> Path:
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": MODEL,
        "data": {"kind": "synthetic", "synthetic": {"samples": 256, "samples_per_shard": 32, "image_size": 12}},
        "parallel": {"engine": "none"},
        "train": {"steps": 6, "micro_batch_size": 8, "log_every": 1, "eval_batches": 1, "checkpoint_every": 2},
        "tracking": {"system_metrics": False, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(config: Path, *overrides: str, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.cli", "train", str(config), *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launcher.cli", "train", str(config), *overrides]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "artifacts" / "model.safetensors")


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path):
    _train(_config(tmp_path, "straight"))
    interrupted = _config(tmp_path, "interrupted")
    _train(interrupted, "train.steps=6")
    checkpoints = tmp_path / "runs" / "interrupted" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    # Lose everything after step 2, as a crash right after that checkpoint would.
    for step in ("step_00000004", "step_00000006"):
        subprocess.run(["rm", "-r", str(checkpoints / step)], check=True)
    (checkpoints / ".step_00000004.tmp").mkdir()  # a half-written checkpoint is ignored
    result = _train(interrupted)
    assert "resumed from" in result.stderr and "step_00000002" in result.stderr
    a, b = _final_model(tmp_path / "runs" / "straight"), _final_model(tmp_path / "runs" / "interrupted")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow  # 40 s; async completion at 2 ranks runs by default (test_reliability_checkpoint)
def test_async_checkpoints_under_bf16_resume_bitwise_at_two_processes(tmp_path):
    """Asynchronous DCP writes (completed before the next save) and bf16 autocast: resume is still exact."""
    sections = {"parallel": {"engine": "fsdp", "dp_shard": 2}, "train": {"async_checkpoint": True, "precision": "bf16"}}
    _train(_config(tmp_path, "straight", **sections), nproc=2)
    interrupted = _config(tmp_path, "interrupted", **sections)
    _train(interrupted, nproc=2)
    checkpoints = tmp_path / "runs" / "interrupted" / "checkpoints"
    for step in ("step_00000004", "step_00000006"):
        subprocess.run(["rm", "-r", str(checkpoints / step)], check=True)
    result = _train(interrupted, nproc=2)
    assert "step_00000002" in result.stderr
    a, b = _final_model(tmp_path / "runs" / "straight"), _final_model(tmp_path / "runs" / "interrupted")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_corrupted_checkpoint_is_skipped(tmp_path):
    config = _config(tmp_path, "corrupt", train={"steps": 4})
    _train(config)
    newest = tmp_path / "runs" / "corrupt" / "checkpoints" / "step_00000004"
    victim = next(p for p in sorted((newest / "dcp").iterdir()) if p.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    result = _train(config, "train.steps=6")
    assert "checksum mismatch" in result.stderr and "resumed from" in result.stderr
    assert "step_00000002" in result.stderr.split("resumed from")[1].splitlines()[0]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.5)


def test_two_process_fsdp_run_killed_resumed_and_resharded(tmp_path):
    config = _config(tmp_path, "fsdp", parallel={"engine": "fsdp", "dp_shard": -1},
                     train={"steps": 8, "checkpoint_every": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "launcher.cli", "train", str(config)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    checkpoints = tmp_path / "runs" / "fsdp" / "checkpoints"
    _wait_for(checkpoints / "step_00000002" / "COMPLETE.json", proc, timeout=400)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-run
    proc.wait()
    result = _train(config, nproc=2)
    assert "resumed from" in result.stderr
    assert (checkpoints / "step_00000008" / "COMPLETE.json").exists()
    # Reshard: the 2-rank FSDP2 checkpoint continues in one process without sharding.
    result = _train(config, "parallel.engine=none", "train.steps=10")
    assert "resharded" in result.stderr and "resumed from" in result.stderr
    assert (checkpoints / "step_00000010" / "COMPLETE.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_run_is_read_back_from_a_real_mlflow_server(tmp_path, mlflow_server):
    import mlflow

    config = _config(tmp_path, "tracked", tracking={"uri": mlflow_server, "experiment": "e2e"}, train={"steps": 3})
    _train(config)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run_id = (tmp_path / "runs" / "tracked" / "mlflow_run_id").read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "3" and run.data.params["model.attention"] == "alpha"
    assert run.data.tags["layout"].startswith("none:") and run.data.tags["world_size"] == "1"
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert "eval_top1" in run.data.metrics
    # MFU per logged step, as torchtitan logs it: model FLOPs per second over the device's peak.
    mfu, samples_per_s = (client.get_metric_history(run_id, key) for key in ("mfu", "samples_per_s"))
    assert [m.step for m in mfu] == [1, 2, 3] and len(client.get_metric_history(run_id, "tokens_per_s")) == 3
    peak = float(run.data.tags["peak_flops_per_device"])
    assert "matmul" in run.data.tags["peak_flops_source"] and peak > 1e8  # measured on this CPU
    flops_per_sample = model_flops_per_sample(ModelConfig.model_validate(MODEL))
    for m, s in zip(mfu, samples_per_s):
        assert 0 < m.value < 1
        assert m.value == pytest.approx(flops_per_sample * s.value / peak, rel=1e-3)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for d in ("plots", "model") for a in client.list_artifacts(run_id, d)}
    assert {"config.yaml", "plots/curves.png", "model/model.safetensors"} <= artifacts


def test_system_metrics_go_into_the_run_and_nowhere_else(tmp_path, mlflow_server):
    import mlflow

    config = _config(tmp_path, "monitored", tracking={"uri": mlflow_server, "system_metrics": True}, train={"steps": 3})
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(config)], cwd=tmp_path,
                            env={**_env(), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "not found" not in result.stderr
    run_id = (tmp_path / "runs" / "monitored" / "mlflow_run_id").read_text()
    metrics = mlflow.MlflowClient(tracking_uri=mlflow_server).get_run(run_id).data.metrics
    assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_artifacts_of_an_embedded_store_lie_beside_it(tmp_path):
    import mlflow

    store = tmp_path / "runs" / "mlflow.db"
    config = _config(tmp_path, "embedded", tracking={"uri": f"sqlite:///{store}"}, train={"steps": 2})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(config)], cwd=elsewhere, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (elsewhere / "mlruns").exists()
    run_id = (tmp_path / "runs" / "embedded" / "mlflow_run_id").read_text()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    assert client.get_run(run_id).info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml"}


@pytest.mark.slow  # 35 s; DeepSpeed checkpoints are resumed by default in test_checkpoint_engines
def test_deepspeed_run_resumes_exactly(tmp_path):
    prepare_deepspeed_on_cpu()  # for the launched processes
    layout = {"engine": "deepspeed", "dp_shard": -1, "offload_param": "cpu", "offload_optimizer": "cpu"}
    straight = _config(tmp_path, "ds-straight", parallel=layout, train={"steps": 4, "checkpoint_every": 2})
    _train(straight, nproc=2)
    resumed = _config(tmp_path, "ds-resumed", parallel=layout, train={"steps": 4, "checkpoint_every": 2})
    _train(resumed, nproc=2)
    subprocess.run(["rm", "-r", str(tmp_path / "runs" / "ds-resumed" / "checkpoints" / "step_00000004")], check=True)
    result = _train(resumed, nproc=2)
    assert "resumed from" in result.stderr
    a, b = _final_model(tmp_path / "runs" / "ds-straight"), _final_model(tmp_path / "runs" / "ds-resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
