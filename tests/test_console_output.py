"""What a user reads: no warnings they cannot act on, one progress line per log step in a log file, and the
CPU threads chosen for them (real ``translution launch`` and ``train`` processes, stderr not a terminal)."""

from __future__ import annotations

import pytest

from reliability.harness import launch_cmd, lines_with, run, train_cmd, write_config

pytestmark = pytest.mark.multiprocess

NOISE = ("DTensor random operators may not have complete support",  # FSDP2 on a CPU mesh
         "returned a view tensor",  # FSDP2, on every bank chunk
         "assuming the intent is to save in a single process")  # DCP, at every checkpoint of one process
PINNED = ["env", "-u", "OMP_NUM_THREADS", "taskset", "-c", "0"]  # no user choice of threads; one core


def _assert_quiet_with_one_line_per_log_step(stderr: str, steps: int) -> None:
    assert not [word for word in NOISE if word in stderr], stderr[-4000:]
    assert "\r" not in stderr, "a progress bar was drawn into a file"
    assert [len(lines_with(stderr, f"step {s}/{steps}: loss")) for s in range(2, steps + 1, 2)] == [1] * (steps // 2)


def test_two_fsdp_processes_print_only_what_matters(tmp_path):
    config = write_config(tmp_path, "quiet", parallel={"engine": "fsdp", "dp_shard": -1}, train={"log_every": 2})
    result = run([*PINNED, *launch_cmd(config, nproc=2)])
    _assert_quiet_with_one_line_per_log_step(result.stderr, 6)
    assert lines_with(result.stderr, "translution launch: 1 CPU thread(s) per process: 1 core(s) available / 2 "
                                     "process(es)")
    assert lines_with(result.stderr, "OMP_NUM_THREADS=1 ", "launcher.torchrun")


def test_one_process_chooses_its_threads_and_checkpoints_quietly(tmp_path):
    config = write_config(tmp_path, "single", train={"log_every": 2})
    result = run([*PINNED, *train_cmd(config)])
    _assert_quiet_with_one_line_per_log_step(result.stderr, 6)
    assert lines_with(result.stderr, "INFO", "1 CPU thread(s) per process: 1 core(s) available / 1 process(es)")
