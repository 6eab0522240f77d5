"""CPU profile of one training step of a ``bench_parallel.py`` layout: where the step's time goes, by operator.

Builds rank by rank through the trainer's own set-up (``training.run.setup`` + ``build_backend``), runs two
warm-up steps and three timed ones, then profiles one step with ``torch.profiler`` and prints rank 0's
operators by self CPU time.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py 2 parallel.engine=none parallel.tp=2
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py 2 parallel.engine=fsdp parallel.dp_replicate=2 parallel.dp_shard=1
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench_parallel import GLOBAL_BATCH, build_config  # noqa: E402


def rank_main(rank: int, world: int, overrides: tuple[str, ...]) -> None:
    from torch.profiler import ProfilerActivity, profile

    from training.run import build_backend, setup
    from training.tasks import ClassificationTask

    torch.set_num_threads(1)
    cfg = build_config(overrides, world)
    model = cfg.model
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, model.channels, model.image_size, model.image_size, generator=generator)
    labels = torch.randint(model.num_classes, (GLOBAL_BATCH,), generator=generator)
    ctx = setup(cfg)
    backend = build_backend(cfg, ctx)
    rows = slice(ctx.dp_rank * cfg.train.micro_batch_size, (ctx.dp_rank + 1) * cfg.train.micro_batch_size)
    batch, task = [(images[rows], labels[rows])], ClassificationTask()
    for _ in range(2):
        backend.train_step(batch, task.step)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        backend.train_step(batch, task.step)
        times.append(time.perf_counter() - started)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.train_step(batch, task.step)
    if rank == 0:
        print(f"median step {statistics.median(times) * 1e3:.0f} ms")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))


def main() -> None:
    from helpers.processes import run_in_processes

    procs, overrides = int(sys.argv[1]), tuple(sys.argv[2:])
    run_in_processes(rank_main, procs, overrides, timeout_s=600)


if __name__ == "__main__":
    main()
