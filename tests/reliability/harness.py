"""Real processes for the fault tests: tiny configs, ``translution train``/``launch`` runs, checkpoint reads,
an MLflow server that can be killed and restarted, a small tmpfs, and leftover-process checks.

Everything runs on the CPU with ``OMP_NUM_THREADS=1`` and a 2-layer ViT of a few thousand
parameters, so a run costs its start-up (seconds) rather than its steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"arch": "vit", "attention": "alpha", "dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "mlp_dim": 32,
         "alpha_rank": 2, "image_size": 12, "patch_size": 4, "channels": 1, "num_classes": 10}


def write_config(directory: Path, name: str, **sections: dict[str, Any]) -> Path:
    """A tiny synthetic-data run ``name`` under ``directory/runs``; ``sections`` update the defaults per section."""
    cfg: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(directory / "runs"), "seed": 0},
        "model": MODEL,
        "data": {"kind": "synthetic", "synthetic": {"samples": 256, "samples_per_shard": 32, "image_size": 12}},
        "parallel": {"engine": "none"},
        "train": {"steps": 6, "micro_batch_size": 8, "log_every": 1, "eval_batches": 1, "checkpoint_every": 2},
        "tracking": {"enabled": False, "system_metrics": False, "uri": f"sqlite:///{directory / 'mlflow.db'}"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


MARKER = "TRANSLUTION_TEST_RUN"
"""Set, to a fresh id, in the environment of every command a test starts: torchrun workers live in sessions
of their own and outlive a killed torchrun, so this is how all of a command's processes are found."""


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "TRANSLUTION_FAULT"}
    return {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1", MARKER: uuid.uuid4().hex, **extra}


def train_cmd(config: Path, *overrides: str) -> list[str]:
    """One plain process: ``translution train CONFIG …``."""
    return [sys.executable, "-m", "launcher.cli", "train", str(config), *overrides]


def launch_cmd(config: Path, *overrides: str, nproc: int, max_restarts: int = 0) -> list[str]:
    """``translution launch CONFIG … --nproc-per-node N --max-restarts R`` (torchrun underneath)."""
    return [sys.executable, "-m", "launcher.cli", "launch", str(config), *overrides, "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts)]


def processes_of(marker: str) -> list[psutil.Process]:
    """Live processes started with ``MARKER=marker`` (zombies excluded)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARKER) == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def reap(marker: str, why: str) -> list[str]:
    """Kill what is left of a command (SIGABRT first, so faulthandler prints where each was stuck); describe it."""
    left = processes_of(marker)
    if not left:
        return []
    described = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} {' '.join(proc.cmdline()[-4:])}")
    for sig in (signal.SIGABRT, signal.SIGKILL):
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        time.sleep(1.0)
    if described:
        print(f"{why}: killed {described}", file=sys.stderr)
    return described


def start(cmd: list[str], *, fault: str | None = None, stdout: Any = subprocess.PIPE,
          stderr: Any = subprocess.PIPE, **extra_env: str) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own with a fresh marker (``proc.marker``) and ``$TRANSLUTION_FAULT``."""
    environment = env(**extra_env, **({"TRANSLUTION_FAULT": fault} if fault else {}))
    proc = subprocess.Popen(cmd, env=environment, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
    proc.marker = environment[MARKER]  # type: ignore[attr-defined]
    return proc


def run(cmd: list[str], *, fault: str | None = None, expect: int | None = 0, timeout: float = 300,
        **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end and check its exit code and that it left no process behind."""
    proc = start(cmd, fault=fault, **extra_env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        reap(proc.marker, "timeout")
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout}s:\n{err[-6000:]}") from None
    left = reap(proc.marker, "left behind")
    assert not left, f"{' '.join(cmd)} left processes behind: {left}"
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if expect is not None:
        assert result.returncode == expect, f"exit {result.returncode}, expected {expect}:\n{err[-6000:]}"
    return result


def lines_with(text: str, *words: str) -> list[str]:
    """The lines of ``text`` holding every one of ``words`` (log lines to assert on)."""
    return [line for line in text.splitlines() if all(w in line for w in words)]


# -- checkpoints -----------------------------------------------------------------------


def dcp_state(checkpoint: Path, scratch: Path) -> dict[str, Any]:
    """Model and optimizer state of a checkpoint directory, flattened to ``model.…``/``optim.…`` keys.

    Read whole in this process (no process group), so checkpoints written at any world size compare.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = scratch / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "dcp", target)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, (list, tuple)) and not all(isinstance(v, (int, float, str)) for v in value):
            for i, child in enumerate(value):
                walk(f"{prefix}.{i}", child)
        else:
            flat[prefix] = value

    walk("", torch.load(target, weights_only=False))
    return flat


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same keys, and every tensor equal bit for bit (NaN included), every other value equal."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and value.shape == b[key].shape, key
            assert torch.equal(_bits(value), _bits(b[key])), f"{key} differs"
        else:
            assert value == b[key], key


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until ``path`` exists (a run reached a point: its MLflow run, a complete checkpoint) while ``proc`` lives."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.05)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, f"process exited with {proc.returncode} before listening on {port}"
            assert time.monotonic() < deadline, f"nothing listens on {port} after {timeout}s"
            time.sleep(0.3)


class MlflowServer:
    """``mlflow server`` on a fixed port and SQLite store: killed and started again, it is the same server.

    ``app_name="basic-auth"`` serves MLflow's login app, configured by ``server_env`` (its admin account,
    CSRF key and ``MLFLOW_AUTH_CONFIG_PATH``).
    """

    def __init__(self, directory: Path, app_name: str | None = None, server_env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.app_name = app_name
        self.server_env = server_env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.directory / 'server.db'}",
               "--artifacts-destination", str(self.directory / "artifacts"),
               *(["--app-name", self.app_name] if self.app_name else [])]
        log = (self.directory / "server.log").open("a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True,
                                     env=env(**{"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.server_env}))
        wait_for_port(self.port, self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL the server and its workers: a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


# -- a small filesystem --------------------------------------------------------------------


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (needs root); skips the test where mounting is not allowed."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the disk-full tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)
