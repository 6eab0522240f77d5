"""``translution launch``: the commands it builds (dry runs under local, SLURM, Kubernetes and JobSet
environments), the checks that refuse a launch, and real multi-process launches on CPU."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.processes import prepare_deepspeed_on_cpu
from launcher.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENTRY = [sys.executable, "-c", "import sys; from launcher.cli import main; sys.exit(main())"]
SCHEDULER_VARS = ("SLURM_", "PET_", "JOBSET_", "JOB_", "MASTER_", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                  "KUBERNETES_", "TRANSLUTION_HOSTFILE")

TINY = {
    "model": {"arch": "vit", "attention": "alpha", "dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32,
              "alpha_rank": 2, "image_size": 16, "patch_size": 8, "channels": 1, "num_classes": 4},
    "data": {"kind": "synthetic", "synthetic": {"samples": 64, "samples_per_shard": 16, "image_size": 16,
                                                "num_classes": 4}},
    "parallel": {"engine": "fsdp"},
    "train": {"steps": 2, "micro_batch_size": 4, "log_every": 1, "eval_batches": 1},
    "optim": {"warmup_steps": 0},
    "tracking": {"enabled": False},
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No scheduler variables from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith(SCHEDULER_VARS):
            monkeypatch.delenv(name)
    monkeypatch.setattr("launcher.topology.shutil.which", lambda name: None)  # no nvidia-smi, no scontrol
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice: launch adds none of its own to the command


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "tiny", "output_dir": str(tmp_path / "runs")}, **TINY}))
    return path


def dry_run(capsys, *argv: str) -> list[str]:
    assert main(["launch", *argv, "--dry-run"]) == 0
    return shlex.split(capsys.readouterr().out)


def refused(capsys, *argv: str) -> str:
    assert main(["launch", *argv]) == 2
    return capsys.readouterr().err


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_local_standalone(capsys, config):
    argv = dry_run(capsys, str(config), "train.steps=3", "--nproc-per-node", "2", "--log-dir", "/tmp/logs")
    # a fresh rendezvous store per restart attempt (docs/reliability.md), then the command
    assert argv[:2] == ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "TRANSLUTION_TOPOLOGY=local"]
    assert argv[2:5] == [sys.executable, "-m", "launcher.torchrun"]  # torchrun, exiting 128 + signal on preemption
    assert option(argv, "--shutdown-timeout") == "60"  # cluster.stop_grace_s
    assert option(argv, "--signals-to-handle") == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # SLURM's early warning
    assert "--standalone" in argv and option(argv, "--nproc-per-node") == "2"
    assert (option(argv, "--log-dir"), option(argv, "--redirects"), option(argv, "--tee")) == ("/tmp/logs", "3", "3")
    assert argv[-5:] == ["--module", "launcher.cli", "train", str(config), "train.steps=3"]


def test_options_and_overrides_mix(capsys, config):
    argv = dry_run(capsys, "--max-restarts", "2", str(config), "--nproc-per-node", "2", "train.steps=3")
    assert option(argv, "--max-restarts") == "2" and argv[-1] == "train.steps=3"


def test_procs_from_cluster_section(capsys, config):
    argv = dry_run(capsys, str(config), "cluster.procs_per_node=2", "cluster.max_restarts=1")
    assert (option(argv, "--nproc-per-node"), option(argv, "--max-restarts")) == ("2", "1")


def test_slurm_one_launcher_per_node(capsys, config, monkeypatch):
    for name, value in {"SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4",
                        "SLURM_NODEID": "2", "SLURM_NTASKS_PER_NODE": "2"}.items():
        monkeypatch.setenv(name, value)
    argv = dry_run(capsys, str(config))
    assert "TRANSLUTION_TOPOLOGY=slurm" in argv and "--standalone" not in argv
    assert (option(argv, "--nnodes"), option(argv, "--nproc-per-node")) == ("4", "2")
    assert (option(argv, "--rdzv-backend"), option(argv, "--rdzv-endpoint"), option(argv, "--rdzv-id")) == (
        "c10d", "gpu01:29500", "777")


def test_pytorchjob_pod(capsys, config, monkeypatch):
    for name, value in {"PET_NNODES": "2:2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "1",
                        "PET_MASTER_ADDR": "tiny-master-0", "PET_MASTER_PORT": "29500",
                        "PET_RDZV_ENDPOINT": "tiny-master-0:29500", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    argv = dry_run(capsys, str(config))
    assert "TRANSLUTION_TOPOLOGY=kubernetes" in argv
    assert (option(argv, "--nnodes"), option(argv, "--nproc-per-node")) == ("2", "2")
    assert option(argv, "--rdzv-endpoint") == "tiny-master-0:29500"


def test_elastic_range_checks_both_ends(capsys, config, monkeypatch):
    monkeypatch.setenv("PET_NNODES", "1:3")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "2")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "w-0:29400")
    argv = dry_run(capsys, str(config))
    assert option(argv, "--nnodes") == "1:3"
    err = refused(capsys, str(config), "parallel.dp_replicate=3")
    assert "world size 2 is not divisible" in err and "nodes=1 × procs_per_node=2" in err


def test_jobset_pod(capsys, config, monkeypatch):
    for name, value in {"JOBSET_NAME": "tiny", "REPLICATED_JOB_NAME": "node", "JOB_COMPLETION_INDEX": "1",
                        "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"}.items():
        monkeypatch.setenv(name, value)
    argv = dry_run(capsys, str(config))
    assert "TRANSLUTION_TOPOLOGY=jobset" in argv
    assert option(argv, "--rdzv-endpoint") == "tiny-node-0-0.tiny:29500"


def test_deepspeed_per_node_launcher(capsys, config, monkeypatch):
    for name, value in {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "1",
                        "SLURM_NTASKS_PER_NODE": "2"}.items():
        monkeypatch.setenv(name, value)
    argv = dry_run(capsys, str(config), "parallel.engine=deepspeed")
    assert argv[1:4] == [sys.executable, "-u", "-m"] and argv[4] == "deepspeed.launcher.runner"
    assert (option(argv, "--num_nodes"), option(argv, "--num_gpus"), option(argv, "--master_addr")) == ("2", "2", "n1")
    assert ("--no_ssh" in argv, option(argv, "--node_rank")) == (True, "1")
    assert not Path(option(argv, "--hostfile")).exists()  # a dry run writes nothing
    assert "--max-restarts" in refused(capsys, str(config), "parallel.engine=deepspeed", "--max-restarts", "1")


def test_deepspeed_hostfile_only_from_first_host(capsys, config, tmp_path, monkeypatch):
    monkeypatch.setattr("launcher.topology._local_names", lambda: {"b"})
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=1\n")
    err = refused(capsys, str(config), "parallel.engine=deepspeed", "--hostfile", str(hostfile))
    assert "run launch on a" in err


@pytest.mark.parametrize("argv, message", [
    (["parallel.dp_replicate=3", "--nproc-per-node", "2"], "dp_replicate·dispp·tp = 3"),
    (["parallel.dp_shard=4", "--nproc-per-node", "2"], "do not match the world size 2"),
    (["parallel.tp=4"], "tp=4 must divide heads=2"),
    (["train.steps=0"], "train.steps"),
    (["cluster.nodes=4"], "cluster.nodes=4 but no multi-node job was detected"),
    (["--nnodes", "2"], "set MASTER_ADDR"),
    (["cluster.max_restarts=-1"], "cluster.max_restarts: Input should be greater than or equal to 0"),
])
def test_refused_before_anything_starts(capsys, config, argv, message):
    assert message in refused(capsys, str(config), *argv)


def test_bad_option_value_is_a_usage_error(capsys, config):
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", str(config), "--nproc-per-node", "0"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCHEDULER_VARS)}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _completed(run_dir: Path, world: int) -> None:
    [checkpoint] = sorted((run_dir / "checkpoints").glob("step_*"))
    assert (checkpoint / "COMPLETE.json").exists()
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == [f"rank_{r}.pt" for r in range(world)]


@pytest.mark.multiprocess
def test_real_launch_two_processes(config, tmp_path):
    """torchrun really starts two `translution train` processes; both write their shard and their log."""
    logs = tmp_path / "logs"
    proc = subprocess.run([*ENTRY, "launch", str(config), "--nproc-per-node", "2", "--log-dir", str(logs)],
                          cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launcher.torchrun --standalone" in proc.stderr
    _completed(tmp_path / "runs" / "tiny", world=2)
    assert sorted(p.parent.name for p in logs.glob("*/attempt_0/*/stderr.log")) == ["0", "1"]
    meta = json.loads(next((tmp_path / "runs" / "tiny" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["world_size"] == 2


@pytest.mark.multiprocess
def test_real_deepspeed_launch_on_one_machine_needs_no_ssh(config, tmp_path):
    """DeepSpeed's launcher with the hostfile launch writes for this machine starts both ranks locally."""
    prepare_deepspeed_on_cpu()
    proc = subprocess.run([*ENTRY, "launch", str(config), "parallel.engine=deepspeed", "parallel.dp_shard=-1",
                           "--nproc-per-node", "2"], cwd=ROOT, env=_launch_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed.launcher.runner" in proc.stderr and "ssh" not in proc.stderr.replace("--no_ssh", "")
    _completed(tmp_path / "runs" / "tiny", world=2)


@pytest.mark.multiprocess
def test_real_two_node_rendezvous_on_one_machine(config, tmp_path):
    """Two launchers (two "nodes") meet at a c10d rendezvous, as on a cluster, one process each."""
    env = {**_launch_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    argv = [*ENTRY, "launch", str(config), "--nnodes", "2", "--nproc-per-node", "1"]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert all("--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" in out for out in outputs)
    _completed(tmp_path / "runs" / "tiny", world=2)


@pytest.mark.multiprocess
def test_bad_config_exits_2_without_starting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "train": {"steps": "many"}}))
    proc = subprocess.run([*ENTRY, "launch", str(bad), "--nproc-per-node", "2"], cwd=ROOT, env=_launch_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.steps" in proc.stderr and "launcher.torchrun" not in proc.stderr
