"""Meta-device construction: build on meta, shard, materialise shard by shard on the owner rank.

A GPT of ~207 GB (8× this 24 GiB machine) is built and sharded over 2 gloo processes
without allocating it: each rank's shard is half the model, counted on meta.
One chunk's shard is then materialised to show what a rank would hold.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from helpers.processes import run_in_processes
from parallelism import ParallelConfig, ParallelDims, build_mesh, parallelize
from parallelism.fsdp import apply_fsdp
from parallelism.materialize import full_bytes, local_numel, materialize, shard_bytes
from test_parallel_fsdp import fsdp_layout, global_batches, loss_of, tiny_config
from translution_dist.models import ModelConfig, build_model

pytestmark = [pytest.mark.multiprocess, pytest.mark.filterwarnings("ignore::UserWarning")]  # every test here starts processes

MACHINE_MEMORY = 24 << 30


def _huge_gpt() -> ModelConfig:
    """Width 1024, context 2048, 8 layers: one layer's three banks are 3·2048·1024·1024·4 B ≈ 25.8 GB."""
    return ModelConfig(arch="gpt", attention="translution", preset="large", depth=8, context_length=2048,
                       bank_chunks=64)


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _huge_model_shards(rank: int, world: int) -> None:
    with torch.device("meta"):
        model = build_model(_huge_gpt())
    total = full_bytes(model)
    assert total > 8 * MACHINE_MEMORY
    mesh, pc = fsdp_layout(world)
    apply_fsdp(model, mesh, pc)
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) and p.to_local().is_meta for p in params)
    mine = torch.tensor([shard_bytes(model)], dtype=torch.float64)
    all_ranks = torch.zeros(world, dtype=torch.float64)
    dist.all_gather_into_tensor(all_ranks, mine)
    assert all_ranks.sum().item() == total
    # Dim-0 sharding: a rank holds ceil or floor of each parameter's rows.
    rounding = sum(p[0].numel() * p.element_size() for p in params)
    assert abs(mine.item() - total / world) <= rounding, (mine.item(), total / world, rounding)

    chunk = model.encoder.blocks[0].attn.score_banks[0]
    before = _rss_bytes()
    chunk.to_empty(device="cpu")
    for bank in chunk.children():
        bank.reset_parameters()
    held = sum(local_numel(p) * p.element_size() for p in chunk.parameters())
    full_chunk = sum(p.numel() * p.element_size() for p in chunk.parameters())
    assert held * world == full_chunk
    bound = 1 / 1024  # 1/sqrt(C_in·C_out)
    assert all(0 < p.to_local().abs().max().item() <= bound for p in chunk.parameters())
    assert 0.9 * held < _rss_bytes() - before < 2 * held
    assert sum(local_numel(p) for p in model.parameters() if not p.to_local().is_meta) == held // 4


def _materialized_shards(rank: int, world: int) -> None:
    cfg = tiny_config("gpt", "translution", 3)
    mesh, pc = fsdp_layout(world)
    models = []
    for _ in range(2):
        with torch.device("meta"):
            model = build_model(cfg)
        apply_fsdp(model, mesh, pc)
        models.append(materialize(model, "cpu", seed=0, mesh=mesh))
    first, second = models
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), "same seed and layout, same weights"
    weight = first.encoder.blocks[0].attn.score_banks[0].q.weight.to_local()
    shards = [torch.empty_like(weight) for _ in range(world)]
    dist.all_gather(shards, weight.contiguous())
    assert not torch.equal(shards[0], shards[1]), "each shard draws its own numbers"
    x, y = global_batches(cfg, 1, steps=1)[0]
    assert torch.isfinite(loss_of(first, x, y))


def _materialized_with_model_parallelism(rank: int, world: int) -> None:
    dims = ParallelDims.resolve(ParallelConfig(engine="fsdp", backend="gloo", dispp=2, tp=2), world)
    mesh = build_mesh(dims, "cpu")
    with torch.device("meta"):
        model = build_model(tiny_config("gpt", "translution", 3))
    parallelize(model, dims, mesh)
    materialize(model, "cpu", seed=0, mesh=mesh)
    for name, param in model.named_parameters():
        full = param.detach().full_tensor()
        copies = [torch.empty_like(full) for _ in range(world)]
        dist.all_gather(copies, full)
        assert all(torch.equal(copy, full) for copy in copies), f"ranks disagree on {name}"
    bank = model.encoder.blocks[0].attn.score_banks[1].q.weight.detach().full_tensor()
    rows, heads = bank.shape[0] // 2, bank.shape[2] // 2
    assert not torch.equal(bank[:rows], bank[rows:2 * rows]), "dispp shards draw their own numbers"
    assert not torch.equal(bank[..., :heads], bank[..., heads:]), "tp shards draw their own numbers"


def test_a_model_larger_than_the_machine_shards_on_meta():
    run_in_processes(_huge_model_shards, 2)


def test_materialize_is_deterministic_and_draws_every_shard():
    run_in_processes(_materialized_shards, 2)


def test_materialize_with_model_parallelism_agrees_across_ranks():
    """dispp=2 × tp=2: replicated parameters (norms, plain projections) are equal on every
    rank, however many numbers each rank's shards drew before them."""
    run_in_processes(_materialized_with_model_parallelism, 4)
