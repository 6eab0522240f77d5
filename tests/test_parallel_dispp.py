"""Displacement parallelism (dispp=2) and its composition with heads (tp×dispp = 2×2), also
across two simulated nodes under FSDP2.

Every case takes 3 AdamW steps next to the unsharded model of the same seed in real gloo
processes: losses, every gradient (gathered with ``full_tensor``) and the final weights agree
to 1e-5 in fp32. A 2×2 checkpoint written with DCP loads into one unsharded process. The
imbalance report is checked on its own.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from helpers.processes import compare_cases, run_in_processes
from parallelism import ParallelDims, build_mesh, displacement_balance
from parallelism.config import ParallelConfig
from translution_dist.models import ModelConfig, build_model
from translution_dist.ops import CausalLayout, ImageGridLayout

VIT = dict(arch="vit", image_size=6, patch_size=2, channels=1, num_classes=5)  # 3×3 grid: 10 tokens, K=28
GPT = dict(arch="gpt", context_length=8, vocab_size=11)  # K=8
TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, alpha_rank=2)
DISPP2 = dict(engine="none", dispp=2)
TP2_DISPP2 = dict(engine="none", tp=2, dispp=2)

DISPP_CASES = {
    "vit-translution": ({**VIT, "attention": "translution"}, DISPP2),
    "vit-alpha": ({**VIT, "attention": "alpha", "bank_chunks": 2}, DISPP2),
    "gpt-translution": ({**GPT, "attention": "translution", "bank_chunks": 2}, DISPP2),
    "gpt-alpha": ({**GPT, "attention": "alpha"}, DISPP2),
    # dense q/k scores on every rank, value banks split: each rank must count only its own pairs
    "vit-translution-relative-v": ({**VIT, "attention": "translution", "relative": "v"}, DISPP2),
    # score banks split, plain values: partial outputs of a plain projection are summed
    "gpt-translution-relative-qk": ({**GPT, "attention": "translution", "relative": "qk", "bank_chunks": 3},
                                    DISPP2),
    # α without a value term (no v_up) in a hybrid; α with a bank-less score side (q_down) and RoPE;
    # α with a value term only (dense scores), rectangular grid, mean pooling
    "gpt-alpha-qk-hybrid": ({**GPT, "attention": "alpha", "relative": "qk", "relative_blocks": 1}, DISPP2),
    "vit-alpha-k-rope": ({**VIT, "attention": "alpha", "relative": "k", "position": "rope", "bank_chunks": 2},
                         DISPP2),
    "vit-alpha-v-rectangular": ({**VIT, "image_size": [4, 6], "attention": "alpha", "relative": "v",
                                 "pool": "mean"}, DISPP2),
}

GRID_CASES = {
    "vit-translution": ({**VIT, "attention": "translution"}, TP2_DISPP2),
    # chunks of 9, 9 and 10 rows: uneven row shards (5 + 4), also in the checkpoint
    "vit-alpha": ({**VIT, "attention": "alpha", "bank_chunks": 3}, TP2_DISPP2),
    "gpt-translution": ({**GPT, "attention": "translution", "relative": "kv"}, TP2_DISPP2),
    "gpt-alpha-vocab-parallel": ({**GPT, "attention": "alpha", "bank_chunks": 2},
                                 {**TP2_DISPP2, "vocab_parallel": True}),
    "vit-alpha-qv-rope": ({**VIT, "attention": "alpha", "relative": "qv", "position": "rope"}, TP2_DISPP2),
}
CHECKPOINTED = "vit-alpha"

ACROSS_NODES_CASES = {  # 2 simulated nodes × 2 processes; FSDP2 over what is left (dp_shard=1 or 2)
    "tp=2 in a node × dispp=2 across nodes, vit-translution": ({**VIT, "attention": "translution"},
                                                             dict(engine="fsdp", tp=2, dispp=2)),
    "tp=2 in a node × dispp=2 across nodes, gpt-alpha": ({**GPT, "attention": "alpha", "bank_chunks": 2},
                                                       dict(engine="fsdp", tp=2, dispp=2)),
    "dispp=4 over both nodes, gpt-translution": ({**GPT, "attention": "translution"}, dict(engine="fsdp", dispp=4)),
}


def _run(world_size: int, cases: dict, checkpoint_dir: str | None = None) -> dict:
    kwargs = {name: dict(model_fields={**TINY, **model}, parallel_fields=parallel)
              for name, (model, parallel) in cases.items()}
    if checkpoint_dir is not None:
        kwargs[CHECKPOINTED]["checkpoint_dir"] = checkpoint_dir
    return run_in_processes(compare_cases, world_size, kwargs)[0]


@pytest.fixture(scope="module")
def dispp_results() -> dict:
    return _run(2, DISPP_CASES)


@pytest.fixture(scope="module")
def grid_checkpoint(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dcp_2x2"))


@pytest.fixture(scope="module")
def grid_results(grid_checkpoint) -> dict:
    return _run(4, GRID_CASES, grid_checkpoint)


def _nodes_of_groups(rank: int, world_size: int, cases: dict) -> dict[str, dict[str, list[int]]]:
    """Per case, the simulated node (``GROUP_RANK``) of every rank in this rank's dispp and tp groups."""
    node = torch.tensor([int(os.environ["GROUP_RANK"])])
    nodes = [torch.zeros_like(node) for _ in range(world_size)]
    dist.all_gather(nodes, node)
    groups = {}
    for name, (_, parallel) in cases.items():
        mesh = build_mesh(ParallelDims.resolve(ParallelConfig(**parallel), world_size), "cpu")
        groups[name] = {dim: [int(nodes[r]) for r in mesh[dim].mesh.flatten().tolist()] for dim in ("dispp", "tp")}
    return groups


def _across_nodes(rank: int, world_size: int, cases: dict) -> dict:
    kwargs = {name: dict(model_fields={**TINY, **model}, parallel_fields=parallel)
              for name, (model, parallel) in cases.items()}
    return {"nodes": _nodes_of_groups(rank, world_size, cases), **compare_cases(rank, world_size, kwargs)}


@pytest.mark.multiprocess
def test_dispp_across_two_simulated_nodes_matches_single_process():
    """Ranks 0–1 are node 0 and 2–3 node 1 (as torchrun numbers two nodes of 2): the mesh order keeps
    tp inside a node and puts dispp across the nodes; losses, gradients and weights match one process."""
    results = run_in_processes(_across_nodes, 4, ACROSS_NODES_CASES, procs_per_node=2)
    for rank, result in enumerate(results):
        for name in ACROSS_NODES_CASES:
            nodes = result["nodes"][name]
            assert sorted(set(nodes["dispp"])) == [0, 1], f"rank {rank}, {name}: dispp group inside one node"
            assert len(set(nodes["tp"])) == 1, f"rank {rank}, {name}: tp group spans nodes"
            _assert_matched(result[name])


def _assert_matched(result) -> None:
    assert isinstance(result, dict), result
    assert max(v for k, v in result.items() if k != "reference_state") < 1e-5


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", DISPP_CASES)
def test_dispp2_matches_single_process(dispp_results, case):
    _assert_matched(dispp_results[case])


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", GRID_CASES)
def test_tp2_dispp2_matches_single_process(grid_results, case):
    _assert_matched(grid_results[case])


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_tp2_dispp2_checkpoint_loads_unsharded(grid_results, grid_checkpoint):
    """DCP reshards the [Shard(0), Shard(2)] banks of a 2×2 run into plain tensors of one process."""
    expected = grid_results[CHECKPOINTED]["reference_state"]
    model = build_model(ModelConfig(**TINY, **GRID_CASES[CHECKPOINTED][0]))
    state = model.state_dict()
    dcp.load(state, checkpoint_id=grid_checkpoint, no_dist=True)
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_balance_counts_every_pair_once():
    layout = ImageGridLayout(4, 4)
    for dispp in (2, 4):
        for bank_chunks in (1, 3):
            balance = displacement_balance(layout, dispp, bank_chunks)
            assert len(balance.pairs_per_rank) == dispp
            assert sum(balance.pairs_per_rank) == 17 * 17


def test_balance_of_causal_windows_is_even():
    """Causal pair counts fall linearly, so heavy/light interleaving balances them exactly."""
    balance = displacement_balance(CausalLayout(160), 4)
    assert balance.pairs_per_rank == (3220,) * 4
    assert balance.max_over_mean == 1.0
    assert "max/mean 1.000" in str(balance)


def test_balance_reports_the_busiest_rank():
    # Chunks of 2 rows, stored counts [4, 5 | 3, 6 | 2, 7 | 1, 8]: rank 1 gets every second row.
    balance = displacement_balance(CausalLayout(8), 2, bank_chunks=4)
    assert balance.pairs_per_rank == (10, 26)
    assert balance.max_over_mean == pytest.approx(26 / 18)
    assert displacement_balance(CausalLayout(8), 2, bank_chunks=4, num_tokens=4).pairs_per_rank == (0, 10)
    assert displacement_balance(CausalLayout(8), 2).pairs_per_rank == (18, 18)
