"""FSDP2 ZeRO-3 (with and without CPU offload, HSDP) against the single-process model.

Every case trains a tiny ViT/GPT with full Translution or α-Translution for three AdamW steps
(weight decay, gradient clipping) on 2 gloo processes, from the single-process model's
weights (loaded through ``load_full_state``), and checks the loss at every step, the
gradients of the first step and the parameters at the end, gathered, against the
single-process model fed the whole global batch. It also checks that a rank never holds more
than one bank chunk gathered.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from parallelism import ParallelConfig, build_mesh
from parallelism.bank_memory import BankGatherProbe
from parallelism.fsdp import apply_fsdp, bank_chunks
from parallelism.materialize import load_full_state, materialize
from translution_dist.models import ModelConfig, build_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 3
MICRO_BATCH = 4
LR = 1e-3
TOL = dict(rtol=1e-4, atol=2e-5)


# -- process helpers -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; a failure in any re-raises here."""
    torch.multiprocessing.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world,
                                          start_method="spawn")


def fsdp_layout(world: int, **fields) -> tuple[DeviceMesh, ParallelConfig]:
    """The mesh and resolved config of an FSDP2 layout of ``world`` ranks."""
    cfg = ParallelConfig(engine="fsdp", backend="gloo", **fields).resolve(world)
    return build_mesh(cfg, world, "cpu"), cfg


# -- models and data ---------------------------------------------------------------------------

def tiny_config(arch: str, attention: str, bank_chunks: int) -> ModelConfig:
    extra = dict(image_size=8, patch_size=4, channels=1, num_classes=5) if arch == "vit" else dict(
        context_length=8, vocab_size=32)
    return ModelConfig(arch=arch, attention=attention, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32,
                       alpha_rank=2, bank_chunks=bank_chunks, **extra)


def global_batches(cfg: ModelConfig, world: int, steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = MICRO_BATCH * world
    if cfg.arch == "vit":
        return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)) for _ in range(steps)]
    tokens = [torch.randint(0, 32, (n, 9), generator=g) for _ in range(steps)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def mean_over_ranks(value: Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def sharded_copy(cfg: ModelConfig, reference: nn.Module, mesh: DeviceMesh, pc: ParallelConfig) -> nn.Module:
    """The model built on meta, sharded, and loaded with ``reference``'s weights."""
    with torch.device("meta"):
        model = build_model(cfg)
    apply_fsdp(model, mesh, pc)
    return load_full_state(model, "cpu", reference.state_dict(), cpu_offload=pc.cpu_offload)


def train_and_compare(cfg: ModelConfig, model: nn.Module, reference: nn.Module, batch_rows: slice,
                      full: Callable[[Tensor], Tensor]) -> None:
    """Three steps of each model; ``model`` sees the rows ``batch_rows`` of every global batch."""
    opt, ref_opt = adamw(model), adamw(reference)
    for step, (x, y) in enumerate(global_batches(cfg, dist.get_world_size())):
        ref_loss = loss_of(reference, x, y)
        ref_loss.backward()
        loss = loss_of(model, x[batch_rows], y[batch_rows])
        loss.backward()
        assert mean_over_ranks(loss) == pytest.approx(ref_loss.item(), rel=1e-5), f"loss of step {step}"
        if step == 0:
            for (name, p), r in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(full(p.grad), r.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")
        for m in (model, reference):
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(full(p.detach()), r.detach(), **TOL, msg=lambda m: f"{name}: {m}")


# -- workers -----------------------------------------------------------------------------------

def _zero3_cases(rank: int, world: int, arch: str, attention: str) -> None:
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    for cpu_offload in (False, True):
        mesh, pc = fsdp_layout(world, cpu_offload=cpu_offload)
        for chunks in (1, 3):
            cfg = tiny_config(arch, attention, chunks)
            torch.manual_seed(0)
            reference = build_model(cfg)
            model = sharded_copy(cfg, reference, mesh, pc)
            with BankGatherProbe(model, "fsdp") as probe:
                train_and_compare(cfg, model, reference, rows, lambda t: t.full_tensor())
            assert probe.samples > 0
            assert probe.peak == probe.chunk_numel, (cpu_offload, chunks, probe.peak, probe.chunk_numel)
            if chunks == 3:
                whole_layer = sum(p.numel() for c in bank_chunks(model.encoder.blocks[0]) for p in c.parameters())
                assert probe.chunk_numel * 2 < whole_layer


def _hsdp_case(rank: int, world: int) -> None:
    mesh, pc = fsdp_layout(world, dp_replicate=2, dp_shard=2)
    cfg = tiny_config("gpt", "translution", 3)
    torch.manual_seed(0)
    reference = build_model(cfg)
    model = sharded_copy(cfg, reference, mesh, pc)
    weight = model.encoder.blocks[0].attn.score_banks[0].q.weight
    assert weight.device_mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
    assert weight.to_local().shape[0] * 2 >= weight.shape[0] > weight.to_local().shape[0]
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    with BankGatherProbe(model, "fsdp") as probe:
        train_and_compare(cfg, model, reference, rows, lambda t: t.full_tensor())
    assert probe.peak == probe.chunk_numel


def _prefetching_chunks_are_seen(rank: int, world: int) -> None:
    """The probe's own check: let every chunk prefetch the previous one (FSDP2's default
    would) and the probe must see two chunks gathered at once."""
    cfg = tiny_config("gpt", "translution", 3)
    with torch.device("meta"):
        model = build_model(cfg)
    mesh, pc = fsdp_layout(world)
    apply_fsdp(model, mesh, pc)
    materialize(model, "cpu", seed=0, mesh=mesh)
    for attn in (block.attn for block in model.encoder.blocks):
        for banks in (attn.score_banks, attn.value_banks):
            for later, earlier in zip(banks[1:], banks[:-1]):
                later.set_modules_to_backward_prefetch([earlier])
    x, y = global_batches(cfg, 1, steps=1)[0]
    with BankGatherProbe(model, "fsdp") as probe:
        loss_of(model, x, y).backward()
    assert probe.peak == 2 * probe.chunk_numel


# -- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["translution", "alpha"])
@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_zero3_matches_single_process(arch, attention):
    """2 ranks, with and without CPU offload, bank_chunks 1 and 3; one chunk gathered at a time."""
    spawn(_zero3_cases, 2, arch, attention)


def test_hsdp_matches_single_process():
    """dp_replicate=2 × dp_shard=2 on 4 ranks."""
    spawn(_hsdp_case, 4)


def test_probe_sees_two_chunks_when_chunks_prefetch():
    spawn(_prefetching_chunks_are_seen, 2)
