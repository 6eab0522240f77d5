"""One training process, end to end: distributed set-up → sharded model → data → loop.

The layout is resolved once (:class:`parallelism.ParallelDims`) and passed on. The model is
built on the meta device, sharded by ``parallelism`` and materialised shard by shard on its
owner, so no rank ever holds the whole model. A single process with no layout skips the
process group entirely. The run installs the loop's wrappers: fault injection when
``$TRANSLUTION_FAULT`` is set, and the diagnosis of stalled collectives.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from parallelism import (
    ParallelDims,
    apply_activation_checkpoint,
    build_mesh,
    data_parallel_coordinates,
    finish_collectives,
    init_distributed,
    parallelize,
)
from parallelism.materialize import materialize
from parallelism.pipeline import Pipeline, split_model
from training.backend import DistContext, TrainingBackend
from training.config import Config, ConfigError, dump_config
from training.faults import FAULT_ENV, FaultInjectingBackend, faults_for, parse_faults
from training.pipeline_backend import PipelineBackend
from training.provenance import keep_tokenizer
from training.quiet import silence_unactionable_warnings
from training.run_identity import OtherRunError, check_run_identity
from training.run_lock import RunDirectoryLock, RunDirectoryLocked, in_use
from training.stall import diagnose_stalls
from training.tasks import check_model_fits_data
from training.threads import describe, threads_per_process, user_threads
from training.torch_backend import TorchBackend
from training.trainer import Trainer, TrainResult
from translution_dist.data.loader import build_dataloader
from translution_dist.data.sources import open_source
from translution_dist.models import build_model

log = logging.getLogger("translution.train")


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def resolve_layout(cfg: Config, world_size: int) -> ParallelDims:
    """The layout of this process, or a config error (exit code 2) before any process group or directory exists."""
    parse_faults(os.environ.get(FAULT_ENV, ""))
    try:
        dims = ParallelDims.resolve(cfg.parallel, world_size)
    except ValueError as err:
        raise ConfigError(f"parallel: {err}") from err
    if dims.engine != "none" and "RANK" not in os.environ:
        raise ConfigError(f"parallel.engine={dims.engine} needs the process group that torchrun sets up: start it "
                          "with `translution launch CONFIG --nproc-per-node N`, or set parallel.engine=none to "
                          "train in this one process")
    return dims


def setup(cfg: Config) -> DistContext:
    """Join the process group (when launched as several processes) and build the mesh."""
    dims = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if not dims.uses_process_group:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(0, 0, device, dims, None, 0, 1)
    device = init_distributed(dims.config, timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    mesh = build_mesh(dims, device.type)
    dp_rank, dp_size = data_parallel_coordinates(mesh)
    return DistContext(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), device, dims, mesh, dp_rank, dp_size)


def build_model_to_train(cfg: Config) -> torch.nn.Module:
    """The model of ``cfg`` with the configured activation recomputation applied (before any sharding)."""
    return apply_activation_checkpoint(build_model(cfg.model), cfg.train.activation_checkpoint)


def build_sharded_model(cfg: Config, ctx: DistContext) -> torch.nn.Module:
    torch.manual_seed(cfg.run.seed)
    if ctx.mesh is None:
        with ctx.device:
            return build_model_to_train(cfg)
    with torch.device("meta"):
        model = build_model_to_train(cfg)
    parallelize(model, ctx.dims, ctx.mesh)
    materialize(model, ctx.device, seed=cfg.run.seed, mesh=ctx.mesh, cpu_offload=ctx.dims.config.cpu_offload)
    return model


def build_pipeline_stages(cfg: Config, ctx: DistContext) -> Pipeline:
    """This rank's pipeline stages of the meta-built model, each sharded like a whole model and materialised."""
    torch.manual_seed(cfg.run.seed)
    with torch.device("meta"):
        model = build_model_to_train(cfg)
    pipeline = split_model(model, ctx.dims.config, ctx.mesh["pp"].get_local_rank())
    for stage in pipeline.modules:
        parallelize(stage, ctx.dims, ctx.mesh)
        materialize(stage, ctx.device, seed=cfg.run.seed, mesh=ctx.mesh, cpu_offload=ctx.dims.config.cpu_offload)
    return pipeline


def build_backend(cfg: Config, ctx: DistContext) -> TrainingBackend:
    """DeepSpeed builds and shards the model itself; the torch backend gets a model sharded here."""
    if ctx.dims.engine == "deepspeed":
        from training.deepspeed_backend import DeepSpeedBackend

        torch.manual_seed(cfg.run.seed)
        return DeepSpeedBackend(cfg, ctx, lambda: build_model_to_train(cfg))
    if ctx.dims.pp_size > 1:
        return PipelineBackend(cfg, ctx, build_pipeline_stages(cfg, ctx))
    return TorchBackend(cfg, ctx, build_sharded_model(cfg, ctx))


def check_data(cfg: Config) -> list[str]:
    """Open the configured splits and hold the model against them, so that missing data, or data the model
    cannot take, is refused before any process or process group starts. Returns notes to log."""
    try:
        _, _, info = open_source(cfg.data, "train")
        if cfg.train.eval_batches:
            open_source(cfg.data, "test")
    except (OSError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err
    try:
        return check_model_fits_data(cfg.model, info)
    except ValueError as err:
        where = f"data.path={cfg.data.path}" if cfg.data.path else "data.synthetic"
        raise ConfigError(f"{err}; data: {where}") from err


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


def _locked(reason: str) -> str:
    return (f"run.name: {reason}; two runs in one directory would overwrite each other's checkpoints: wait for "
            "that run to end, or choose another run.name or run.output_dir")


def _unwritable(cfg: Config, err: OSError) -> str:
    return (f"run.output_dir: cannot write the run directory {cfg.run_dir} ({err.strerror or err}); "
            "choose a writable run.output_dir")


def check_run_dir(cfg: Config, *, lock: bool) -> None:
    """Refuse, as :func:`write_run_dir` would, a run directory that cannot be written or (``lock``) that a live
    run holds, without creating anything: a probe file in the nearest existing directory, made and removed."""
    existing = next(p for p in (cfg.run_dir, *cfg.run_dir.parents, Path(".")) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(_unwritable(cfg, err)) from err
    holder = RunDirectoryLock(cfg.run_dir).holder() if lock else None
    if holder is not None:
        raise ConfigError(_locked(in_use(cfg.run_dir, holder)))


def check_before_launch(cfg: Config, *, nodes: int) -> None:
    """What every process of a run would refuse at start-up, checked once before any is started.

    ``translution launch`` calls it, so that bad input ends there with exit code 2 and one line,
    as ``translution train`` alone does, not with a rank's error inside torchrun's traceback. On
    several nodes the other nodes' launchers may start after node 0's rank 0 took the run's lock,
    so the lock is checked on one node only.
    """
    parse_faults(os.environ.get(FAULT_ENV, ""))
    check_data(cfg)
    check_run_dir(cfg, lock=nodes == 1)


def write_run_dir(cfg: Config, ctx: DistContext) -> RunDirectoryLock | None:
    """Create and lock the run directory and record the resolved config and tokenizer (rank 0), before any state.

    A directory that cannot be written, that another live run holds, or whose checkpoints are of
    another run (:mod:`training.run_identity`) is a config error on every rank (exit code 2),
    found before training. Rank 0 gets the lock to release at the end.
    """
    error, lock = None, None
    if ctx.is_main:
        try:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunDirectoryLock(cfg.run_dir)
            lock.acquire()
            for warning in check_run_identity(cfg, cfg.run_dir):
                log.warning(warning)
            (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
            keep_tokenizer(cfg.data, cfg.run_dir)
        except RunDirectoryLocked as err:
            lock = None
            error = _locked(str(err))
        except OtherRunError as err:
            error = str(err)
        except OSError as err:
            error = _unwritable(cfg, err)
    if ctx.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        if lock is not None:
            lock.release()
        raise ConfigError(error)
    return lock


def set_cpu_threads(ctx: DistContext) -> None:
    """Unless the user (or ``translution launch``) set ``OMP_NUM_THREADS``: the cores available, shared by
    this node's processes (:mod:`training.threads`), logged once."""
    if user_threads() is not None:
        return
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = threads_per_process(procs)
    torch.set_num_threads(threads)
    if ctx.is_main:
        log.info("%s", describe(threads, procs))


def _with_faults(trainer: Trainer) -> None:
    """Route the trainer's steps and checkpoint writes through ``$TRANSLUTION_FAULT``'s faults, if any."""
    faults = faults_for(trainer.ctx.rank)
    if faults:
        trainer.backend = FaultInjectingBackend(trainer.backend, faults, trainer.ctx.rank, lambda: trainer.step)


def train(cfg: Config) -> TrainResult:
    silence_unactionable_warnings()
    notes = check_data(cfg)
    ctx = setup(cfg)
    _configure_logging(ctx.rank)
    set_cpu_threads(ctx)
    if ctx.is_main:
        for note in notes:
            log.warning("%s", note)
    lock = None
    try:
        backend = build_backend(cfg, ctx)
        loaders = build_loaders(cfg, ctx)
        lock = write_run_dir(cfg, ctx)
        trainer = Trainer(cfg, ctx, backend, loaders)
        _with_faults(trainer)
        with diagnose_stalls(ctx.rank, ctx.world_size, cfg.train.collective_timeout_s, lambda: trainer.phase):
            result = trainer.run()
        finish_collectives()  # only on success: after a failure a peer may be gone
        if ctx.is_main:
            log.info("done: step %d, loss %.4f, eval %s; run directory %s", result.final_step, result.final_loss,
                     {k: round(v, 4) for k, v in result.eval_metrics.items()}, result.run_dir)
        return result
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
