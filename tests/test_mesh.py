"""The ``parallel`` config (resolution, validation, model checks) and the device mesh built from it.

Meshes are built on PyTorch's fake process group: one process plays any rank of a large
world, so rank layouts are checked without starting processes. The end-of-run wait for
collectives in flight runs on real gloo processes.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch.testing._internal.distributed.fake_pg import FakeStore

from helpers.processes import run_in_processes
from parallelism import (
    ParallelConfig,
    ParallelDims,
    build_mesh,
    data_parallel_coordinates,
    dp_mesh,
    finish_collectives,
    init_distributed,
    parallelize,
)
from translution_dist.models import ModelConfig, build_model

TINY_GPT = dict(arch="gpt", context_length=8, vocab_size=11, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)


@pytest.fixture
def fake_world():
    """``fake_world(rank, world_size)`` joins a fake process group as ``rank``; left at teardown."""

    def join(rank: int, world_size: int) -> None:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()


# -- resolution ---------------------------------------------------------------------------------

def test_resolve_fills_the_rest_of_the_world():
    cfg = ParallelConfig(dp_replicate=2, tp=2, dispp=2)
    resolved = cfg.resolve(32)
    assert (resolved.dp_replicate, resolved.dp_shard, resolved.dispp, resolved.tp) == (2, 4, 2, 2)
    assert cfg.dp_shard == -1 and not cfg.is_resolved and resolved.is_resolved
    assert resolved.model_parallel_size == 4


def test_resolve_names_degrees_and_world_size():
    with pytest.raises(ValueError, match=r"dp_shard=3 · dispp=1 · tp=2 = 6 do not match the world size 8"):
        ParallelConfig(dp_shard=3, tp=2).resolve(8)
    with pytest.raises(ValueError, match=r"world size 8 is not divisible by pp·dp_replicate·dispp·tp = 3"):
        ParallelConfig(tp=3).resolve(8)


def test_engine_none_has_no_data_parallel_reduction():
    assert ParallelConfig(engine="none", tp=2, dispp=2).resolve(4).dp_shard == 1
    with pytest.raises(ValueError, match=r"engine=none does not reduce gradients across the 2 data-parallel"):
        ParallelConfig(engine="none", tp=2).resolve(4)


@pytest.mark.parametrize("fields,message", [
    (dict(tp=0), "tp"),
    (dict(dp_shard=0), "dp_shard must be positive or -1"),
    (dict(pipeline=2), "pipeline"),
    (dict(engine="deepspeed", tp=2), "engine=deepspeed .* use engine=fsdp"),
    (dict(engine="fsdp", offload_param="cpu"), "apply to engine=deepspeed; with engine=fsdp use cpu_offload"),
    (dict(engine="deepspeed", cpu_offload=True), "cpu_offload applies to engine=fsdp"),
    (dict(engine="deepspeed", offload_optimizer="nvme"), "needs nvme_path"),
    (dict(engine="none", mixed_precision="bf16"), "use train.precision"),
])
def test_invalid_fields_name_the_field_and_the_fix(fields, message):
    with pytest.raises(ValidationError, match=message):
        ParallelConfig(**fields)


# -- model checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("model,parallel,message", [
    (dict(attention="translution"), dict(tp=4), r"tp=4 must divide heads=2.*divisors of 2"),
    (dict(attention="alpha"), dict(tp=4), r"banks \[K, heads·r, heads·r\] are split by heads on their output"),
    (dict(attention="translution", heads=4, mlp_dim=30), dict(tp=4), r"tp=4 must divide mlp_dim=30"),
    (dict(attention="self_attention", position="relative_bias"), dict(tp=2), "relative_bias"),
    (dict(attention="self_attention"), dict(dispp=2), "attention=self_attention has none"),
    (dict(attention="translution", relative_blocks=0), dict(dispp=2), "relative_blocks=0 leaves none"),
    (dict(attention="alpha", bank_chunks=4), dict(dispp=4), r"dispp=4 exceeds the 2 displacement rows .*bank_chunks=4"),
    (dict(attention="translution"), dict(dispp=9), r"exceeds the 8 displacement rows"),
])
def test_check_model(model, parallel, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**parallel).check_model(ModelConfig(**{**TINY_GPT, **model}))


@pytest.mark.parametrize("attention,parallel,message", [
    ("acmix", dict(tp=2), r"tp=2 does not apply to attention=acmix: .*mixes the features of all heads; set tp: 1"),
    ("acmix", dict(dispp=2), "attention=acmix has none"),
    ("shift_structure", dict(tp=2), r"tp=2 does not apply to attention=shift_structure: .*table \[K, heads\]"),
    ("shift_structure", dict(dispp=2), "attention=shift_structure has none"),
    ("uniformer", dict(tp=2), r"tp=2 does not apply to attention=uniformer: .*depthwise convolutions"),
    ("mixformer", dict(tp=2), r"tp=2 does not apply to attention=mixformer: .*channel interaction"),
])
def test_mixers_refuse_model_parallelism_they_do_not_have(attention, parallel, message):
    mixer = ModelConfig(arch="vit", attention=attention, image_size=6, patch_size=2, dim=16, heads=2, dim_head=8)
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**parallel).check_model(mixer)


def test_vocab_parallel_needs_gpt_and_tp():
    vit = ModelConfig(arch="vit", attention="alpha", image_size=6, patch_size=2, dim=16, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="vocab_parallel applies to arch=gpt with tp>1"):
        ParallelConfig(tp=2, vocab_parallel=True).check_model(vit)
    with pytest.raises(ValueError, match="vocab_parallel applies to arch=gpt with tp>1"):
        ParallelConfig(vocab_parallel=True).check_model(ModelConfig(**TINY_GPT, attention="alpha"))
    ParallelConfig(tp=2, dispp=2, vocab_parallel=True).check_model(ModelConfig(**TINY_GPT, attention="alpha"))


# -- meshes -------------------------------------------------------------------------------------

def test_mesh_keeps_model_parallel_groups_inside_a_node(fake_world):
    fake_world(rank=5, world_size=16)
    mesh = build_mesh(ParallelDims.resolve(ParallelConfig(dp_replicate=2, tp=2, dispp=2), 16), "cpu")
    assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "dispp", "tp")
    assert mesh.mesh.tolist() == torch.arange(16).reshape(1, 2, 2, 2, 2).tolist()
    assert mesh["tp"].mesh.tolist() == [4, 5]  # consecutive ranks
    assert mesh["dispp"].mesh.tolist() == [5, 7]  # tp apart: the 4 model-parallel ranks 4..7 share a node
    assert dp_mesh(mesh).mesh.tolist() == [1, 5, 9, 13]  # spans the nodes
    assert data_parallel_coordinates(mesh) == (1, 4)


def test_mesh_keeps_size_one_dims(fake_world):
    fake_world(rank=3, world_size=4)
    mesh = build_mesh(ParallelDims.resolve(ParallelConfig(engine="none", tp=4), 4), "cpu")
    assert tuple(mesh[name].size() for name in mesh.mesh_dim_names) == (1, 1, 1, 1, 4)
    assert data_parallel_coordinates(mesh) == (0, 1)
    assert data_parallel_coordinates(None) == (0, 1)


def test_pipeline_stages_are_the_outermost_dim_and_share_their_data(fake_world):
    fake_world(rank=5, world_size=8)
    mesh = build_mesh(ParallelDims.resolve(ParallelConfig(pp=2, tp=2), 8), "cpu")
    assert mesh["pp"].mesh.tolist() == [1, 5]  # a stage group spans the halves of the world (nodes)
    assert dp_mesh(mesh).mesh.tolist() == [5, 7]  # data parallelism stays inside the stage
    assert data_parallel_coordinates(mesh) == (0, 2)  # rank 1, its pp peer, reads the same batch


def test_parallel_dims_check_the_world_size():
    with pytest.raises(ValueError, match="do not match the world size 4"):
        ParallelDims.resolve(ParallelConfig(dp_shard=2, tp=4), 4)
    dims = ParallelDims.resolve(ParallelConfig(dp_replicate=2, tp=2), 8)
    assert (dims.dp_size, dims.model_parallel_size, dims.sizes["dp_shard"]) == (4, 2, 2)
    assert dims.tag(bank_chunks=3) == "fsdp:dp_replicate=2,dp_shard=2,tp=2,dispp=1,bank_chunks=3"


def test_parallelize_checks_mesh_and_model(fake_world):
    fake_world(rank=0, world_size=4)
    tp4 = ParallelDims.resolve(ParallelConfig(engine="none", tp=4), 4)
    mesh = build_mesh(tp4, "cpu")
    model = build_model(ModelConfig(**TINY_GPT, attention="translution"))
    with pytest.raises(ValueError, match="does not match the parallel layout"):
        parallelize(model, ParallelDims.resolve(ParallelConfig(engine="none", tp=2, dispp=2), 4), mesh)
    with pytest.raises(ValueError, match="tp=4 must divide heads=2"):
        parallelize(model, tp4, mesh)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_nccl_needs_cuda():
    with pytest.raises(RuntimeError, match="backend=nccl needs CUDA"):
        init_distributed(ParallelConfig(backend="nccl"))


# -- the end of a run -----------------------------------------------------------------------------

def _unwaited_gathers(rank: int, world_size: int) -> list[bool]:
    """Each rank starts an all-gather on the world and on a second group and never waits for it;
    rank 1 joins each half a second late. Whether each one has finished after ``finish_collectives``."""
    second = dist.new_group(backend="gloo")
    works = []
    for group in (None, second):
        if rank == 1:
            time.sleep(0.5)
        gathered = torch.empty(world_size)
        works.append(dist.all_gather_into_tensor(gathered, torch.tensor([float(rank)]), group=group, async_op=True))
    finish_collectives()
    return [work.is_completed() for work in works]


@pytest.mark.multiprocess
def test_finish_collectives_waits_for_unwaited_work_on_every_group():
    assert run_in_processes(_unwaited_gathers, 2) == [[True, True], [True, True]]
