"""FSDP2 composed with head (tp) and displacement (dispp) parallelism on 2×2 gloo meshes.

``parallelize`` applies tp/dispp and then ``apply_fsdp`` to a model built on meta; the
single-process weights are loaded through ``load_full_state``; each data-parallel rank takes
its part of every global batch. Loss, gradients and weights must match the single-process
model over three AdamW steps, and a rank must never gather more than one bank chunk (its
tp/dispp share of one).
"""

from __future__ import annotations

import pytest
import torch

from helpers.bank_memory import BankGatherProbe
from helpers.processes import run_in_processes
from parallelism import ParallelConfig, ParallelDims, build_mesh, data_parallel_coordinates, parallelize
from parallelism.materialize import load_full_state
from test_parallel_fsdp import case, tiny_config, train_and_compare
from translution_dist.models import build_model

pytestmark = [pytest.mark.multiprocess, pytest.mark.filterwarnings("ignore::UserWarning")]  # every test here starts processes


def _composed_cases(rank: int, world: int, degrees: dict) -> None:
    dims = ParallelDims.resolve(ParallelConfig(engine="fsdp", backend="gloo", dp_shard=2, **degrees), world)
    mesh = build_mesh(dims, "cpu")
    dp_rank, dp_size = data_parallel_coordinates(mesh)
    for arch in ("vit", "gpt"):
        for attention in ("translution", "alpha"):
            cfg = tiny_config(arch, attention, 3)
            torch.manual_seed(0)
            reference = build_model(cfg)
            with torch.device("meta"):
                model = build_model(cfg)
            with case(f"{degrees}/{arch}/{attention}"):
                parallelize(model, dims, mesh)
                load_full_state(model, "cpu", reference.state_dict())
                with BankGatherProbe(model, "fsdp") as probe:
                    train_and_compare(cfg, model, reference, dp_rank, dp_size)
                full_chunk = max(sum(p.numel() for p in chunk.parameters()) for chunk in probe.chunks)
                assert probe.peak == probe.chunk_numel < full_chunk, (probe.peak, probe.chunk_numel, full_chunk)


@pytest.mark.parametrize("degrees", [{"tp": 2}, {"dispp": 2}], ids=["fsdp2x-tp2", "fsdp2x-dispp2"])
def test_fsdp_composed_with_model_parallelism_matches_single_process(degrees):
    run_in_processes(_composed_cases, 4, degrees, timeout_s=300)
