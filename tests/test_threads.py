"""CPU threads per process: the cores available shared by the node's processes, unless OMP_NUM_THREADS says."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from launcher.cli import main
from training import threads


@pytest.mark.parametrize(("procs", "cores", "expected"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (8, 128, 16), (1, 1, 1)])
def test_cores_are_shared_by_the_processes_of_a_node(procs, cores, expected):
    assert threads.threads_per_process(procs, cores) == expected


@pytest.mark.parametrize(("files", "limit"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({}, None),
])
def test_a_container_cpu_quota_is_read_from_cgroup_v2_or_v1(tmp_path, files, limit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads._cgroup_cpu_limit(tmp_path) == limit


def test_available_cores_never_exceed_the_affinity_mask():
    assert 1 <= threads.available_cores() <= len(os.sched_getaffinity(0))


def _launch_env(capsys, config: Path) -> dict[str, str]:
    assert main(["launch", str(config), "--nproc-per-node", "2", "--dry-run"]) == 0
    words = shlex.split(capsys.readouterr().out)
    return dict(w.split("=", 1) for w in words[:words.index(next(w for w in words if "=" not in w))])


def test_launch_gives_torchrun_the_threads_unless_the_user_chose(tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("model: {arch: vit, attention: alpha, image_size: 16, patch_size: 8, channels: 1}\n"
                      "data: {kind: synthetic}\nparallel: {engine: fsdp}\n")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    assert _launch_env(capsys, config)["OMP_NUM_THREADS"] == "8"  # torchrun alone: 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "OMP_NUM_THREADS" not in _launch_env(capsys, config)  # the user's 3 reaches torchrun as it is
