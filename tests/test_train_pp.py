"""Pipeline parallelism in the trainer: a real 2-process ``pp=2`` run, checkpoints resharded to and from ``pp=1``.

One layout on disk (the unsplit model's names) means a checkpoint crosses ``pp`` both ways: a
single-process run's step-2 checkpoint continues at ``pp=2``, whose step-4 checkpoint continues
in one process again, and the end matches the single-process run that never changed layout.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from test_train import _config, _final_model, _train

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # three torchrun runs (40–110 s on 2 cores): --run-slow keeps CI under 20 min

PIPELINE = {"engine": "fsdp", "dp_shard": 1, "pp": 2, "pp_microbatches": 4, "pp_schedule": "1f1b"}


def _evaluation(result) -> str:
    """The run's final evaluation as logged (metrics rounded to 4 digits)."""
    line = next(line for line in result.stderr.splitlines() if "done: step" in line)
    return line.split(", eval ")[1].split("; run directory")[0]


def _assert_same_model(run_dir, reference: dict[str, torch.Tensor]) -> None:
    final = _final_model(run_dir)
    assert final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_checkpoints_cross_pp_both_ways(tmp_path):
    config = _config(tmp_path, "pp", train={"steps": 6, "checkpoint_every": 2, "eval_batches": 2, "eval_every": 6})
    run_dir, checkpoints = tmp_path / "runs" / "pp", tmp_path / "runs" / "pp" / "checkpoints"
    evaluation = _evaluation(_train(config))  # one process, no pipeline: the reference
    reference = _final_model(run_dir)
    for step in (4, 6):
        shutil.rmtree(checkpoints / f"step_{step:08d}")
    result = _train(config, *(f"parallel.{k}={v}" for k, v in PIPELINE.items()), nproc=2)  # pp=1 → pp=2
    assert "resumed from" in result.stderr
    _assert_same_model(run_dir, reference)
    assert _evaluation(result) == evaluation  # evaluated through the stages
    dcp_to_torch_save(checkpoints / "step_00000004" / "dcp", tmp_path / "step4.pt")
    groups = torch.load(tmp_path / "step4.pt", weights_only=False)["optim"]["param_groups"]
    names = [sorted(group["params"]) for group in groups]
    assert names == [sorted(reference)], "the param group must list every stage's names"
    shutil.rmtree(checkpoints / "step_00000006")
    result = _train(config)  # pp=2 → pp=1: from the pipeline run's step-4 checkpoint
    assert "resumed from" in result.stderr and "step_00000004" in result.stderr
    _assert_same_model(run_dir, reference)
