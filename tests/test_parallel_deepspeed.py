"""DeepSpeed ZeRO-3 with CPU offload against the single-process model, and its config.

DeepSpeed runs on its CPU accelerator over gloo. The optimizer is ``torch.optim.AdamW``
(``cpu_adam=False``: ``torch_adam``), so no DeepSpeedCPUAdam build is needed; DeepSpeed still
JIT-builds its shared-memory communication op once (about 40 s on 2 cores) into
``$TORCH_EXTENSIONS_DIR``, which defaults to the repository's ``.venv/torch_extensions`` where
that venv exists (as in CI), else torch's ``~/.cache/torch_extensions``.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers.bank_memory import BankGatherProbe
from helpers.processes import prepare_deepspeed_on_cpu, run_in_processes
from parallelism.config import ParallelConfig
from parallelism.deepspeed_zero import DEFAULT_NVME_BUFFER, build_deepspeed_engine, deepspeed_config, parameter_sizes
from test_parallel_fsdp import MICRO_BATCH, assert_same, case, global_batches, loss_of, mean_over_ranks, tiny_config
from training.config import OptimSection
from translution_dist.models import ModelConfig, build_model

prepare_deepspeed_on_cpu()  # the tests run on CPU over gloo

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

OPTIM = OptimSection(lr=1e-3, weight_decay=0.1, grad_clip=0.5)
OFFLOADED = ParallelConfig(engine="deepspeed", offload_param="cpu", offload_optimizer="cpu", backend="gloo")


def _gathered(model: nn.Module) -> list[torch.Tensor]:
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _train(engine, reference: nn.Module, cfg: ModelConfig, grad_accum: int) -> None:
    """Three optimizer steps of ``grad_accum`` micro-batches on every rank; the reference
    takes each step's whole global batch at once."""
    from deepspeed.utils import safe_get_full_grad

    rank, world = dist.get_rank(), dist.get_world_size()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                                weight_decay=OPTIM.weight_decay)
    batches = global_batches(cfg, world * grad_accum)
    for step, (x, y) in enumerate(batches):
        ref_loss = loss_of(reference, x, y)
        ref_loss.backward()
        losses = []
        for micro in range(grad_accum):
            rows = slice((micro * world + rank) * MICRO_BATCH, (micro * world + rank + 1) * MICRO_BATCH)
            loss = loss_of(engine, x[rows], y[rows])
            engine.backward(loss)
            losses.append(mean_over_ranks(loss))
            if micro < grad_accum - 1:
                engine.step()
        assert sum(losses) / grad_accum == pytest.approx(ref_loss.item(), rel=1e-5), f"loss of step {step}"
        if step == 0:
            for (name, p), r in zip(engine.module.named_parameters(), reference.parameters(), strict=True):
                assert_same(safe_get_full_grad(p), r.grad, f"grad of {name}")
        engine.step()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), OPTIM.grad_clip)
        ref_opt.step()
        ref_opt.zero_grad()


def _deepspeed_cases(rank: int, world: int, arch: str, layout: ParallelConfig,
                     cases: list[tuple[str, int, int]]) -> None:
    """``(attention, bank_chunks, grad_accum)`` cases, each compared with the single process."""
    for attention, chunks, grad_accum in cases:
        cfg = tiny_config(arch, attention, chunks)
        torch.manual_seed(0)
        reference = build_model(cfg)
        torch.manual_seed(0)
        engine = build_deepspeed_engine(partial(build_model, cfg), layout, OPTIM, micro_batch_size=MICRO_BATCH,
                                        grad_accum=grad_accum, cpu_adam=False)
        with case(f"{arch}/{attention}/bank_chunks={chunks}/grad_accum={grad_accum}"):
            names = [name for name, _ in engine.module.named_parameters()]
            for name, p, r in zip(names, _gathered(engine.module), reference.parameters(), strict=True):
                assert torch.equal(p, r.detach()), f"{name}: zero.Init draws the single-process weights"
            with BankGatherProbe(engine.module, "deepspeed") as probe:
                _train(engine, reference, cfg, grad_accum)
            for name, p, r in zip(names, _gathered(engine.module), reference.parameters(), strict=True):
                assert_same(p, r.detach(), name)
            assert probe.samples > 0 and probe.peak == probe.chunk_numel, (probe.peak, probe.chunk_numel)


def _prefetch_gathers_more(rank: int, world: int) -> None:
    cfg = tiny_config("gpt", "translution", 3)
    torch.manual_seed(0)
    engine = build_deepspeed_engine(partial(build_model, cfg), OFFLOADED, OPTIM, micro_batch_size=MICRO_BATCH,
                                    cpu_adam=False, prefetch_numel=10**9)
    with BankGatherProbe(engine.module, "deepspeed") as probe:
        for x, y in global_batches(cfg, 1, steps=2):  # the first step records the trace prefetching follows
            engine.backward(loss_of(engine, x[:MICRO_BATCH], y[:MICRO_BATCH]))
            engine.step()
    assert probe.peak > probe.chunk_numel


@pytest.mark.multiprocess
@pytest.mark.parametrize("arch", ["vit", "gpt"])
def test_zero3_cpu_offload_matches_single_process(arch):
    """2 ranks, parameters and optimizer on CPU, Translution and α-Translution; bank_chunks=1,
    then bank_chunks=3 with 2 accumulated micro-batches; one chunk gathered at a time."""
    cases = [(attention, *chunks_accum) for attention in ("translution", "alpha") for chunks_accum in ((1, 1), (3, 2))]
    run_in_processes(_deepspeed_cases, 2, arch, OFFLOADED, cases)


def _aio_available() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.skipif(not _aio_available(), reason="NVMe offload needs DeepSpeed's async_io op (libaio-dev)")
def test_zero_infinity_nvme_offload_matches_single_process(tmp_path):
    """Parameters and optimizer state on "NVMe" (a local directory). The first run JIT-builds
    DeepSpeed's async_io and pinned-memory ops (minutes on 2 cores)."""
    nvme = ParallelConfig(engine="deepspeed", offload_param="nvme", offload_optimizer="nvme",
                          nvme_path=str(tmp_path), backend="gloo")
    run_in_processes(_deepspeed_cases, 2, "gpt", nvme, [("translution", 3, 1)], timeout_s=1800)


@pytest.mark.multiprocess
def test_probe_sees_prefetched_chunks():
    """The probe's own check: with prefetching on, more than one chunk is gathered."""
    run_in_processes(_prefetch_gathers_more, 2)


# -- the config dict ---------------------------------------------------------------------------

def _sizes(chunks: int = 3):
    with torch.device("meta"):
        return parameter_sizes(build_model(tiny_config("gpt", "translution", chunks)))


def test_config_keeps_banks_partitioned_and_unprefetched():
    sizes = _sizes()
    config = deepspeed_config(OFFLOADED, OPTIM, micro_batch_size=4, grad_accum=2, sizes=sizes)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_param_persistence_threshold"] < sizes.smallest_bank_parameter
    assert zero["stage3_max_reuse_distance"] == 0 and zero["stage3_prefetch_bucket_size"] == 0
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    assert config["gradient_accumulation_steps"] == 2 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_clipping"] == 0.5
    params = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "AdamW" and params["lr"] == 1e-3 and params["weight_decay"] == 0.1
    assert params["torch_adam"] is False  # an offloaded optimizer uses DeepSpeedCPUAdam by default
    torch_adam = deepspeed_config(OFFLOADED, OPTIM, micro_batch_size=4, grad_accum=1, sizes=sizes, cpu_adam=False)
    assert torch_adam["optimizer"]["params"]["torch_adam"] is True


def test_config_for_nvme_sizes_the_swap_buffers():
    with torch.device("meta"):
        sizes = parameter_sizes(build_model(ModelConfig(arch="gpt", attention="translution", preset="large",
                                                        context_length=2048)))
    assert sizes.largest_parameter > DEFAULT_NVME_BUFFER
    nvme = ParallelConfig(engine="deepspeed", offload_param="nvme", offload_optimizer="nvme", nvme_path="/nvme")
    zero = deepspeed_config(nvme, OPTIM, micro_batch_size=1, grad_accum=1, sizes=sizes)["zero_optimization"]
    assert zero["offload_param"]["nvme_path"] == zero["offload_optimizer"]["nvme_path"] == "/nvme"
    assert zero["offload_param"]["buffer_size"] == sizes.largest_parameter
