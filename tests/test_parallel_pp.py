"""Pipeline parallelism (pp), alone and composed with FSDP2, tp and dispp, against the single-process model.

Each rank slices the meta-built model into its stages (``parallelism.pipeline.split_model``),
shards every stage like a whole model (``parallelize``), loads the single-process weights and
trains three AdamW steps (weight decay, gradient clipping across the stages) through a
``torch.distributed.pipelining`` schedule, with ``pp_microbatches`` micro-batches per step. The
loss of every step, the first step's gradients and the final weights must match the
single-process model fed the whole global batch; the stages' parameters together must be
exactly the model's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from helpers.processes import run_in_processes
from parallelism import ParallelConfig, ParallelDims, build_mesh, data_parallel_coordinates, dp_mesh, parallelize
from parallelism.materialize import load_full_state
from parallelism.pipeline import build_schedule, pipeline_loss, run_schedule, split_model
from test_parallel_fsdp import MICRO_BATCH, adamw, assert_same, case, global_batches, loss_of, tiny_config
from training.grad_norm import clip_grad_norm
from translution_dist.models import build_model

pytestmark = [pytest.mark.multiprocess, pytest.mark.filterwarnings("ignore::UserWarning")]  # every test here starts processes

DEPTH = 4  # room for 4 stages (pp=2 with 2 virtual stages each)


def token_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits ``[..., classes]`` against ``target`` (the last stage's loss)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _pipeline_cases(rank: int, world: int, degrees: dict, cases: list[tuple[str, str, dict]]) -> None:
    dims = ParallelDims.resolve(ParallelConfig(backend="gloo", **degrees), world)
    mesh = build_mesh(dims, "cpu")
    dp_rank, dp_size = data_parallel_coordinates(mesh)
    pp_rank, pp_group = mesh["pp"].get_local_rank(), mesh["pp"].get_group()
    rows = slice(dp_rank * MICRO_BATCH, (dp_rank + 1) * MICRO_BATCH)
    for arch, attention, schedule_fields in cases:
        cfg = tiny_config(arch, attention, 2, depth=DEPTH)
        layout = ParallelDims.resolve(ParallelConfig(backend="gloo", **degrees, **schedule_fields), world)
        torch.manual_seed(0)
        reference = build_model(cfg)
        with torch.device("meta"):
            model = build_model(cfg)
        with case(f"{degrees}/{schedule_fields}/{arch}/{attention}"):
            pipeline = split_model(model, layout.config, pp_rank)
            for stage in pipeline.modules:
                parallelize(stage, layout, mesh)
                load_full_state(stage, "cpu", reference.state_dict(), broadcast=False)
            schedule = build_schedule(pipeline, layout.config, mesh, torch.device("cpu"), token_loss)
            params = {name: p for stage in pipeline.modules for name, p in stage.named_parameters()}
            held = [None] * world
            dist.all_gather_object(held, sorted(params))
            assert sorted({n for names in held for n in names}) == sorted(dict(reference.named_parameters()))
            opt, ref_opt = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.1), adamw(reference)
            expected = dict(reference.named_parameters())
            for step, (x, y) in enumerate(global_batches(cfg, dp_size)):
                ref_loss = loss_of(reference, x, y)
                ref_loss.backward()
                loss = pipeline_loss(run_schedule(schedule, pipeline, x[rows], y[rows]), pipeline, mesh)
                dist.all_reduce(loss, group=dp_mesh(mesh).get_group())
                assert loss.item() / dp_size == pytest.approx(ref_loss.item(), rel=1e-5), f"loss of step {step}"
                if step == 0:
                    for name, p in params.items():
                        assert_same(_full(p.grad), expected[name].grad, f"grad of {name}")
                clip_grad_norm(params.values(), 0.5, pipeline_group=pp_group)
                clip_grad_norm(reference.parameters(), 0.5)
                for o in (opt, ref_opt):
                    o.step()
                    o.zero_grad()
            for name, p in params.items():
                assert_same(_full(p.detach()), expected[name].detach(), name)


SCHEDULES = {"gpipe": dict(pp_schedule="gpipe", pp_microbatches=2),
             "1f1b": dict(pp_schedule="1f1b", pp_microbatches=2),
             "interleaved": dict(pp_schedule="interleaved1f1b", pp_virtual_stages=2, pp_microbatches=2)}


def test_pp2_matches_single_process_for_each_schedule():
    cases = [("gpt", "translution", SCHEDULES["gpipe"]), ("vit", "alpha", SCHEDULES["1f1b"]),
             ("gpt", "alpha", SCHEDULES["interleaved"])]
    run_in_processes(_pipeline_cases, 2, dict(pp=2, engine="none"), cases, timeout_s=300)


def test_pp2_with_fsdp2_matches_single_process():
    cases = [("vit", "translution", SCHEDULES["1f1b"]), ("gpt", "alpha", SCHEDULES["interleaved"])]
    run_in_processes(_pipeline_cases, 4, dict(pp=2, dp_shard=2, engine="fsdp"), cases, timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("degrees", [dict(tp=2, dp_shard=1), dict(dispp=2, dp_shard=1), dict(dp_replicate=2,
                                                                                            dp_shard=1)],
                         ids=["pp2-tp2", "pp2-dispp2", "pp2-hsdp2"])
def test_pp2_composed_matches_single_process(degrees):
    cases = [(arch, attention, SCHEDULES["1f1b"]) for arch in ("vit", "gpt") for attention in ("translution", "alpha")]
    run_in_processes(_pipeline_cases, 4, dict(pp=2, engine="fsdp", **degrees), cases, timeout_s=600)


@pytest.mark.slow
def test_pp2_every_model_and_schedule_matches_single_process():
    cases = [(arch, attention, fields) for arch in ("vit", "gpt") for attention in ("translution", "alpha")
             for fields in SCHEDULES.values()]
    run_in_processes(_pipeline_cases, 2, dict(pp=2, engine="none"), cases, timeout_s=600)
