"""One training process, end to end: distributed set-up → sharded model → data → loop.

The model is built on the meta device, sharded by ``parallelism`` and materialised shard by
shard on its owner, so no rank ever holds the whole model. A single process with no
layout skips the process group entirely.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from parallelism import build_mesh, data_parallel_coordinates, init_distributed, parallelize
from parallelism.materialize import materialize
from translution_dist.config import Config
from translution_dist.data.loader import build_dataloader
from translution_dist.models import build_model
from translution_dist.train.engine import DistContext, TorchEngine
from translution_dist.train.trainer import Trainer, TrainResult, write_run_dir

log = logging.getLogger("translution.train")


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def setup(cfg: Config) -> DistContext:
    """Join the process group (when launched as several processes) and build the mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = cfg.parallel.resolve(world_size)
    if world_size == 1 and layout.engine == "none":
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(0, 1, 0, device, None, 0, 1)
    device = init_distributed(layout, timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    mesh = build_mesh(layout, world_size, device.type)
    dp_rank, dp_size = data_parallel_coordinates(mesh)
    return DistContext(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")), device, mesh,
                       dp_rank, dp_size)


def build_sharded_model(cfg: Config, ctx: DistContext) -> torch.nn.Module:
    torch.manual_seed(cfg.run.seed)
    if ctx.mesh is None:
        with ctx.device:
            return build_model(cfg.model)
    with torch.device("meta"):
        model = build_model(cfg.model)
    layout = cfg.parallel.resolve(ctx.world_size)
    parallelize(model, ctx.mesh, layout)
    materialize(model, ctx.device, seed=cfg.run.seed, mesh=ctx.mesh, cpu_offload=layout.cpu_offload)
    return model


def train(cfg: Config) -> TrainResult:
    ctx = setup(cfg)
    _configure_logging(ctx.rank)
    try:
        model = build_sharded_model(cfg, ctx)
        engine = TorchEngine(cfg, ctx, model)
        batch = cfg.train.micro_batch_size
        loaders = {"train": build_dataloader(cfg.data, split="train", dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                                             batch_size=batch, seed=cfg.run.seed)}
        if cfg.train.eval_batches:
            loaders["eval"] = build_dataloader(cfg.data, split="test", dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                                               batch_size=batch, seed=cfg.run.seed)[0]
        write_run_dir(cfg, ctx)
        result = Trainer(cfg, ctx, engine, loaders).run()
        if ctx.is_main:
            log.info("done: step %d, loss %.4f, eval %s; run directory %s", result.final_step, result.final_loss,
                     {k: round(v, 4) for k, v in result.eval_metrics.items()}, result.run_dir)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
