"""Soak run (``--run-soak``): thousands of small 2-rank FSDP2 steps with periodic checkpoints, MLflow and one
SIGKILL; the resident memory of every rank, sampled all along, must stay flat.

``TRANSLUTION_SOAK_STEPS`` (default 3000) sets the length; ``TRANSLUTION_SOAK_REPORT`` a JSON file for the
samples (docs/reliability.md records a run's figures).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections import defaultdict

import psutil
import pytest

from reliability.harness import launch_cmd, processes_of, reap, start, write_config

pytestmark = pytest.mark.multiprocess  # every test here starts processes

STEPS = int(os.environ.get("TRANSLUTION_SOAK_STEPS", "3000"))
EVERY = max(STEPS // 12, 1)
SAMPLE_S = 2.0
GROWTH_LIMIT_MIB = 16  # steady-state RSS may move by allocator noise, not by a leak per step


def _sample(marker: str, samples: dict) -> None:
    for proc in processes_of(marker):
        with contextlib.suppress(psutil.Error):
            environ = proc.environ()
            if "RANK" in environ and "train" in proc.cmdline():
                key = (int(environ["RANK"]), int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
                samples[key].append((time.time(), proc.memory_info().rss))


@pytest.mark.soak
def test_soak_memory_stays_flat(tmp_path):
    kill_after = EVERY * (STEPS // EVERY // 2)
    config = write_config(tmp_path, "soak", parallel={"engine": "fsdp", "dp_shard": -1},
                          train={"steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 2, "log_every": 50,
                                 "eval_batches": 1},
                          tracking={"enabled": True, "log_model": False})
    samples: dict[tuple[int, int], list[tuple[float, int]]] = defaultdict(list)
    log_path = tmp_path / "soak.log"
    checkpoint = tmp_path / "runs" / "soak" / "checkpoints" / f"step_{kill_after:08d}" / "COMPLETE.json"
    killed = False
    started = time.time()
    with log_path.open("w") as log:
        proc = start(launch_cmd(config, nproc=2, max_restarts=1), stdout=log, stderr=log)
        try:
            while proc.poll() is None:
                _sample(proc.marker, samples)
                if not killed and checkpoint.exists():
                    victim = next(p for p in processes_of(proc.marker)
                                  if p.environ().get("RANK") == "1" and "train" in p.cmdline())
                    victim.kill()
                    killed = True
                time.sleep(SAMPLE_S)
            assert proc.returncode == 0, log_path.read_text()[-4000:]
        finally:
            reap(proc.marker, "soak")
    assert killed and "resumed from" in log_path.read_text()

    report = {"steps": STEPS, "checkpoint_every": EVERY, "killed_after_checkpoint": kill_after,
              "wall_s": round(time.time() - started), "attempts": {}}
    for (rank, attempt), series in sorted(samples.items()):
        rss = [r / 2**20 for _, r in series]
        quarter = max(len(rss) // 4, 1)
        early, late = statistics.median(rss[quarter:2 * quarter] or rss), statistics.median(rss[-quarter:])
        report["attempts"][f"rank {rank} attempt {attempt}"] = {
            "samples": len(rss), "seconds": round(series[-1][0] - series[0][0]),
            "rss_mib": {"min": round(min(rss), 1), "second_quarter_median": round(early, 1),
                        "last_quarter_median": round(late, 1), "max": round(max(rss), 1)},
            "series": [(round(t - started, 1), round(r, 1)) for (t, _), r in zip(series, rss)]}
        if len(rss) >= 20:  # long enough to reach a steady state
            assert late - early < GROWTH_LIMIT_MIB, f"rank {rank} attempt {attempt}: {early:.1f} → {late:.1f} MiB"
    destination = os.environ.get("TRANSLUTION_SOAK_REPORT")
    if destination:
        with open(destination, "w") as f:
            json.dump(report, f, indent=1)
    summary = {k: v["rss_mib"] | {"seconds": v["seconds"]} for k, v in report["attempts"].items()}
    print(json.dumps({k: v for k, v in report.items() if k != "attempts"} | {"attempts": summary}, indent=1))
