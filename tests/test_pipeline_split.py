"""Pipeline stages cut from the model defined once (in process): the split, the slicing, the config's refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from pydantic import ValidationError

from helpers.processes import tiny_batch
from launcher.cli import main
from parallelism import ParallelConfig, ParallelDims
from parallelism.pipeline import balanced_split, block_costs, split_model, stage_blocks, stage_indices
from test_parallel_fsdp import tiny_config
from translution_dist.models import build_model


def test_balanced_split_minimises_the_costliest_stage():
    assert balanced_split([1, 1, 1, 5], 2) == [3]
    assert balanced_split([1] * 6, 3) == [2, 4]
    assert balanced_split([4, 1, 1, 1, 1], 2) == [1]


def test_a_hybrid_puts_fewer_of_its_costlier_relative_blocks_on_a_stage():
    cfg = tiny_config("gpt", "translution", 1, depth=6, relative_blocks=2)
    costs = block_costs(cfg)
    assert costs[0] == costs[1] > costs[2] == costs[5]
    bounds = stage_blocks(ParallelConfig(pp=2), cfg)
    assert bounds[0].stop < 3 and bounds[1].stop == 6
    assert stage_blocks(ParallelConfig(pp=2, pp_split=[4]), cfg) == [range(0, 4), range(4, 6)]


def test_interleaved_stages_loop_over_the_ranks():
    cfg = ParallelConfig(pp=2, pp_schedule="interleaved1f1b", pp_virtual_stages=2)
    assert [stage_indices(cfg, r) for r in (0, 1)] == [[0, 2], [1, 3]]


@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_stages_keep_the_whole_models_names_and_compose_to_its_forward(arch):
    cfg = tiny_config(arch, "alpha", 2, depth=4)
    torch.manual_seed(0)
    model = build_model(cfg)
    layout = ParallelConfig(pp=2, pp_schedule="interleaved1f1b", pp_virtual_stages=2)
    stages = {i: m for r in (0, 1) for i, m in zip(stage_indices(layout, r), split_model(model, layout, r).modules)}
    names = [name for i in sorted(stages) for name in stages[i].state_dict()]
    assert sorted(names) == sorted(model.state_dict()) and len(names) == len(set(names))
    x, _ = tiny_batch(cfg, 2, seed=0)
    out = x
    for i in sorted(stages):
        out = stages[i](out)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_pp_is_outermost_and_not_data_parallel():
    dims = ParallelDims.resolve(ParallelConfig(pp=2, tp=2), 16)
    assert list(dims.sizes) == ["pp", "dp_replicate", "dp_shard", "dispp", "tp"]
    assert dims.config.dp_shard == 4 and dims.dp_size == 4 and dims.pp_size == 2


@pytest.mark.parametrize(("fields", "says"), [
    (dict(pp=2, pp_schedule="interleaved_zero_bubble", pp_virtual_stages=2), "zero-bubble"),
    (dict(pp=2, pp_split=[1, 2]), "pp_split"),
    (dict(pp=2, pp_schedule="interleaved1f1b"), "pp_virtual_stages >= 2"),
    (dict(pp=2, pp_virtual_stages=2), "needs pp_schedule: interleaved1f1b"),
    (dict(pp=2, engine="deepspeed"), "deepspeed"),
])
def test_layouts_that_cannot_work_are_refused_by_field(fields, says):
    with pytest.raises(ValidationError, match=says):
        ParallelConfig(**fields)


def test_more_stages_than_blocks_are_refused():
    with pytest.raises(ValueError, match="exceed depth=2"):
        ParallelConfig(pp=4).check_model(tiny_config("vit", "alpha", 1))


def test_plan_of_a_pipelined_config_lists_the_unpipelined_candidates(tmp_path, capsys):
    """The planner does not price pp yet; a pp config must still get its candidate table (it crashed empty)."""
    from test_plan import RUN

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**RUN, "parallel": {"engine": "fsdp", "pp": 2}, "train": {
        "micro_batch_size": 4, "eval_batches": 0}}))
    assert main(["plan", str(path), "--json", "--nodes", "1", "--gpus-per-node", "4"]) == 0
    candidates = json.loads(capsys.readouterr().out)["candidates"]
    assert candidates and all(c["layout"]["pp"] == 1 for c in candidates)
