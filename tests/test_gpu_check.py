"""``benchmarks/gpu_check.sh``, the prepared one-GPU check: it parses, refuses a machine without a
GPU clearly, and its CPU dry run (tiny sizes) passes every stage and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
                               "OMP_NUM_THREADS": "1", **env})


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_refuses_and_names_the_dry_run(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stdout and "GPU_CHECK_DEVICE=cpu" in proc.stdout
    bench = subprocess.run([sys.executable, "benchmarks/bench_ops.py", "--device", "cuda"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 2 and "--device cuda: CUDA is not available" in bench.stderr


def test_unknown_device_is_refused(tmp_path):
    proc = _run(tmp_path, GPU_CHECK_DEVICE="tpu")
    assert proc.returncode == 2 and "GPU_CHECK_DEVICE must be cuda or cpu" in proc.stderr


@pytest.mark.multiprocess
@pytest.mark.slow
def test_cpu_dry_run_passes_every_stage(tmp_path):
    proc = _run(tmp_path, GPU_CHECK_DEVICE="cpu")
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every stage passed" in summary
    for mode in ("none", "block"):
        result = json.loads((tmp_path / f"train_{mode}.json").read_text())
        assert result["final_step"] == 3 and len(result["history"]["loss"]) == 3
        assert 0 < result["steady_median"]["mfu"] < 1 and result["steady_median"]["tokens_per_s"] > 0
    bench = json.loads((tmp_path / "bench_ops.json").read_text())
    assert bench["device"] == "cpu" and all(r["status"] == "ok" for r in bench["layers"])
