"""A training pod's filesystem as `translution k8s render` sets it up: the root read-only, writable only the
workspace, /tmp, $HOME and /dev/shm. Reproduced with a private mount namespace (needs root; skipped otherwise).

The evidence that the trainers allow ``readOnlyRootFilesystem: true``: a 2-rank torchrun job with checkpoints,
an embedded MLflow store, system metrics and the final plot and model export writes nowhere else. (The MLflow
server was checked the same way by hand: `mlflow server --app-name basic-auth` under this script, with its
store on a writable directory, starts, takes a logged-in run and writes only there, /tmp and $HOME.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from reliability.harness import ROOT, run, write_config

pytestmark = pytest.mark.multiprocess  # starts torchrun and its ranks

POD_FILESYSTEM = ('mkdir -p "$0/.code" && mount --bind "$1" "$0/.code" && mount --rbind "$0" /mnt '
                  '&& mount -o remount,bind,ro / && mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /home '
                  '&& mkdir -p "$1" && mount --bind /mnt/.code "$1" && mount -o remount,bind,ro "$1" '
                  '&& cd /mnt && shift && exec "$@"')
"""The workspace (argument 0) at /mnt, then the root read-only and emptyDirs at /tmp and /home. The code
(argument 1: this checkout and its venv) is mounted back, read-only, at its own path, since a checkout under /tmp
would be hidden by the emptyDir there."""


def _in_pod_filesystem(workspace, *cmd: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", POD_FILESYSTEM, str(workspace), str(ROOT),
            *cmd]


def test_a_two_rank_run_needs_nothing_but_its_volumes(tmp_path):
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -o remount,bind,ro /"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here ({probe.stderr.strip()}); it needs root")
    write_config(tmp_path, "pod", parallel={"engine": "fsdp", "dp_shard": -1},
                 data={"num_workers": 1}, train={"steps": 2, "checkpoint_every": 1},
                 tracking={"enabled": True, "system_metrics": True})
    cmd = _in_pod_filesystem(tmp_path, sys.executable, "-m", "launcher.cli", "launch", "pod.yaml",
                             "run.output_dir=runs", "tracking.uri=null", "--nproc-per-node", "2")
    result = run(cmd, timeout=400, HOME="/home", MLFLOW_TRACKING_URI="")
    assert "Read-only file system" not in result.stderr
    run_dir = tmp_path / "runs" / "pod"
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE.json").is_file()
    assert (run_dir / "artifacts" / "model.safetensors").is_file() and (tmp_path / "runs" / "mlflow.db").is_file()
