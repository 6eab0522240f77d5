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

from parallelism import build_mesh, data_parallel_coordinates, finish_collectives, init_distributed, parallelize
from parallelism.materialize import materialize
from translution_dist.config import Config, ConfigError
from translution_dist.data.loader import build_dataloader
from translution_dist.data.sources import open_source
from translution_dist.models import build_model
from translution_dist.train.engine import DistContext, Engine, TorchEngine
from translution_dist.train.trainer import FAULT_ENV, Trainer, TrainResult, parse_faults, write_run_dir

log = logging.getLogger("translution.train")


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def check_layout(cfg: Config, world_size: int) -> None:
    """Refuse, before any process group or directory exists, a layout this process cannot run (exit code 2)."""
    parse_faults(os.environ.get(FAULT_ENV, ""))
    try:
        layout = cfg.parallel.resolve(world_size)
        cfg.parallel.check_model(cfg.model)
    except ValueError as err:
        raise ConfigError(f"parallel: {err}") from err
    if layout.engine != "none" and "RANK" not in os.environ:
        raise ConfigError(f"parallel.engine={layout.engine} needs the process group that torchrun sets up: start it "
                          "with `translution launch CONFIG --nproc-per-node N`, or set parallel.engine=none to "
                          "train in this one process")


def setup(cfg: Config) -> DistContext:
    """Join the process group (when launched as several processes) and build the mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg, world_size)
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


def build_engine(cfg: Config, ctx: DistContext) -> Engine:
    """DeepSpeed builds and shards the model itself; every other engine gets a model sharded here."""
    if cfg.parallel.engine == "deepspeed":
        from translution_dist.train.deepspeed_adapter import DeepSpeedTrainEngine

        torch.manual_seed(cfg.run.seed)
        return DeepSpeedTrainEngine(cfg, ctx, lambda: build_model(cfg.model))
    return TorchEngine(cfg, ctx, build_sharded_model(cfg, ctx))


def check_data(cfg: Config) -> None:
    """Open the configured splits, so that missing or mismatched data is refused before any process starts."""
    try:
        open_source(cfg.data, "train")
        if cfg.train.eval_batches:
            open_source(cfg.data, "test")
    except (OSError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err


def build_loaders(cfg: Config, ctx: DistContext) -> dict:
    """The train (and eval) loaders; missing or mismatched data is a config error, reported before the run starts."""
    batch = cfg.train.micro_batch_size
    try:
        loaders = {"train": build_dataloader(cfg.data, split="train", dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                                             batch_size=batch, seed=cfg.run.seed)}
        if cfg.train.eval_batches:
            loaders["eval"] = build_dataloader(cfg.data, split="test", dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                                               batch_size=batch, seed=cfg.run.seed)[0]
    except (OSError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err
    return loaders


def train(cfg: Config) -> TrainResult:
    ctx = setup(cfg)
    _configure_logging(ctx.rank)
    try:
        engine = build_engine(cfg, ctx)
        loaders = build_loaders(cfg, ctx)
        write_run_dir(cfg, ctx)
        result = Trainer(cfg, ctx, engine, loaders).run()
        finish_collectives()  # only on success: after a failure a peer may be gone
        if ctx.is_main:
            log.info("done: step %d, loss %.4f, eval %s; run directory %s", result.final_step, result.final_loss,
                     {k: round(v, 4) for k, v in result.eval_metrics.items()}, result.run_dir)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
