"""The terabyte Translution of ``configs/scale/`` fits its cluster, and the real sharding code agrees.

* The model has at least 250 billion parameters (1 TB in fp32), counted on the meta device.
* ``translution plan`` on its cluster (8 nodes × 8 H100 80 GB): the config's layout fits every
  GPU and every node's host memory (the step-time planner's choice is at least as fast per token).
* The dry run: the full model on the meta device, sharded by ``parallelism.parallelize`` on a
  fake process group as each rank of the 64 (a representative eight here; all 64 in the slow
  test), has exactly the shard shapes of the analytic model (:mod:`launcher.shard_model`), and
  FSDP2 allocates exactly the plan's parameter bytes.
* The same rank-by-rank check for small models under every kind of layout (head, displacement
  and data parallelism, HSDP, vocabulary parallelism, ViT and GPT, α-Translution and
  self-attention), where all ranks are cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.memory_model import model_census
from launcher.plan import Cluster, plan
from launcher.shard_dry_run import shard_rank
from launcher.shard_model import Coordinates, local_shape
from parallelism.config import ParallelConfig
from training.config import load_config
from translution_dist.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "scale" / "gpt_1t.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


def test_the_model_is_a_terabyte(cfg):
    census = model_census(cfg.model)
    assert census.numel >= 250e9 and census.numel * 4 >= 1e12
    parts = census.numel_by_component()
    banks = sum(n for name, n in parts.items() if name.startswith("banks"))
    d = cfg.model.dims
    assert banks == d.depth * 3 * cfg.model.context_length * d.dim * d.heads * d.dim_head
    assert sum(parts.values()) == census.numel


def test_every_rank_fits_the_target_cluster(cfg):
    cluster = Cluster.of(cfg)
    assert (cluster.world_size, cluster.gpu_memory) == (64, 81559 * 2**20)
    result = plan(cfg, cluster)
    own = result.config_layout
    assert own is not None and own.fits, own.problems if own else result.config_error
    # The config keeps the layout the memory planner chose (least data movement); the step-time
    # planner prefers a faster one per token (docs/scale.md, "The terabyte table").
    choice = result.choice
    assert choice is not None and choice.time.step_s / choice.time.tokens <= own.time.step_s / own.time.tokens
    assert own.gpu_bytes <= cluster.gpu_memory * (1 - cluster.headroom)
    assert own.host_per_node <= cluster.cpu_memory * (1 - cluster.headroom)
    est = own.estimate
    assert est.param_bytes_per_rank * 64 >= est.parameters * 4  # the shards cover the model
    no_offload = [c for c in result.candidates if c.offload == "none"]
    assert no_offload and not any(c.fits for c in no_offload)  # without offload AdamW's states do not fit


def _dry_run(*args: str) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", str(CONFIG), *args, "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout), time.perf_counter() - start


def _check_ranks(data: dict, count: int) -> int:
    check = data["verification"]
    assert check["ok"] and len(check["ranks"]) == count
    planned = data["config_layout"]["per_rank"]["param_bytes_per_rank"]  # the layout a launch uses: the config's
    assert check["planned_bytes"] == planned
    for rank in check["ranks"]:
        assert rank["mismatches"] == []
        assert rank["allocated_bytes"] == planned  # FSDP2 pads every shard to the first rank's size
        assert rank["local_bytes"] <= planned
    return planned


@pytest.mark.multiprocess
def test_dry_run_of_representative_ranks_matches_the_plan():
    """The real sharding code as the first and last rank and one rank per node (every tp and dp_shard
    coordinate), on a fake process group."""
    data, seconds = _dry_run("--verify-shards")
    planned = _check_ranks(data, 8)
    coordinates = {(r["coordinates"]["dp_shard"], r["coordinates"]["tp"]) for r in data["verification"]["ranks"]}
    assert {tp for _, tp in coordinates} == set(range(8)) and {shard for shard, _ in coordinates} == set(range(8))
    print(f"\n8 ranks sharded and checked in {seconds:.0f} s; {planned:,} B of fp32 parameters per rank")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_dry_run_of_all_64_ranks_matches_the_plan():
    """All 64 ranks (about a second each on a free core; the output is recorded in docs/scale.md)."""
    data, seconds = _dry_run("--verify-shards", ",".join(str(r) for r in range(64)))
    planned = _check_ranks(data, 64)
    print(f"\n64 ranks sharded and checked in {seconds:.0f} s; {planned:,} B of fp32 parameters per rank")


@pytest.mark.multiprocess
def test_dry_run_with_displacement_parallelism_and_hsdp():
    data, _ = _dry_run("parallel.dp_replicate=2", "parallel.dispp=2", "parallel.tp=4",
                       "--verify-shards", "0,5,10,15,34,47,63")
    check = data["verification"]
    layout = data["config_layout"]["layout"]
    assert (layout["dp_replicate"], layout["dp_shard"], layout["dispp"], layout["tp"]) == (2, 4, 2, 4)
    assert check["ok"], check


SMALL_GPT = dict(arch="gpt", attention="translution", dim=32, depth=2, heads=4, dim_head=8, mlp_dim=64,
                 context_length=24, vocab_size=50, bank_chunks=3)
SMALL_VIT = dict(arch="vit", attention="alpha", dim=32, depth=1, heads=4, dim_head=8, mlp_dim=64, alpha_rank=2,
                 image_size=20, patch_size=4, channels=1, num_classes=7, bank_chunks=2)
LAYOUTS = {
    "fsdp, tp=2, dispp=2, dp_shard=2": (SMALL_GPT, dict(engine="fsdp", tp=2, dispp=2)),
    "hsdp 2×2, tp=2": (SMALL_GPT, dict(engine="fsdp", dp_replicate=2, tp=2)),
    "fsdp over 8": (SMALL_GPT, dict(engine="fsdp")),
    "none, tp=2, dispp=4": (SMALL_GPT, dict(engine="none", tp=2, dispp=4)),
    "vocab-parallel gpt, relative kv": ({**SMALL_GPT, "relative": "kv"}, dict(engine="fsdp", tp=4,
                                                                              vocab_parallel=True)),
    "alpha vit, tp=2, dispp=2": (SMALL_VIT, dict(engine="fsdp", tp=2, dispp=2)),
    "self-attention vit, tp=4": ({**SMALL_VIT, "attention": "self_attention", "bank_chunks": 1},
                                 dict(engine="fsdp", tp=4)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_shard_model_matches_the_real_code_on_every_rank(name):
    fields, parallel = LAYOUTS[name]
    model = ModelConfig(**fields)
    layout = ParallelConfig(**parallel).resolve(8)
    census = {p.name: p for p in model_census(model, layout.vocab_parallel).params}
    for rank in range(8):
        shards = shard_rank(model, layout, rank)
        assert shards.mismatches == (), shards.mismatches
        at = Coordinates.of(rank, layout)
        expected = sum(4 * _numel(local_shape(p, layout, at)) for p in census.values())
        assert shards.local_bytes == expected


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
