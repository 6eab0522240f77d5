"""The training loop: step → metrics → MLflow (rank 0) → checkpoint every k steps.

``train(cfg)`` runs in every process that torchrun (or the deepspeed launcher, or a plain
``python``) starts. It builds the model on the meta device, lets ``parallelism`` shard and
materialize it, resumes from the newest good checkpoint of the run directory, and trains.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from translution_dist.config import Config, ConfigError, dump_config, flatten
from translution_dist.train.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state
from translution_dist.train.engine import DistContext, Engine, StepResult
from translution_dist.train.plots import plot_history
from translution_dist.train.tasks import StepOutput, task_for
from translution_dist.train.tracking import Tracker, default_tracking_uri

log = logging.getLogger("translution.train")


class NonFiniteLossError(RuntimeError):
    """The loss or gradients became NaN/inf and the config says to stop."""


class CollectiveTimeoutError(RuntimeError):
    """A collective outlived ``train.collective_timeout_s``: another rank stalled or died before joining it."""


TIMEOUT_REPORT_S = 5  # after a collective timeout, how long the other ranks get to report theirs
FAULT_ENV = "TRANSLUTION_FAULT"
StepFn = Callable[[torch.nn.Module, tuple], StepOutput]
FAULT_ACTIONS = {"kill": ("step", "checkpoint"), "hang": ("step", "checkpoint"), "nan": ("step",)}


@dataclass(frozen=True)
class Fault:
    """One fault to inject: ``ACTION@POINT:N[:rank:R][:restart:K][:seconds:S]`` (see docs/reliability.md)."""

    action: str
    point: str
    at: int
    rank: int | None = None
    restart: int | None = None
    seconds: float = 86400.0


def parse_faults(spec: str) -> list[Fault]:
    """The comma-separated faults of ``$TRANSLUTION_FAULT``; a typo is an error, never a silent no-op."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, _, where = item.partition("@")
        fields = where.split(":")
        try:
            if action not in FAULT_ACTIONS or fields[0] not in FAULT_ACTIONS[action] or len(fields) % 2:
                raise ValueError(item)
            options = dict(zip(fields[2::2], fields[3::2], strict=True))
            if not options.keys() <= {"rank", "restart", "seconds"}:
                raise ValueError(item)
            faults.append(Fault(action, fields[0], int(fields[1]), *(
                int(options[k]) if k in options else None for k in ("rank", "restart")),
                float(options.get("seconds", Fault.seconds))))
        except ValueError as err:
            raise ConfigError(f"{FAULT_ENV}: cannot parse {item!r}; expected ACTION@POINT:N[:rank:R][:restart:K]"
                              f"[:seconds:S] with ACTION@POINT one of kill@step, kill@checkpoint, hang@step, "
                              f"hang@checkpoint, nan@step") from err
    return faults


class FaultInjector:
    """Test hook: acts on the faults of ``$TRANSLUTION_FAULT`` meant for this rank and this torchrun restart.

    Read once, here, so that a run without the variable pays nothing; see docs/reliability.md.
    """

    def __init__(self, rank: int) -> None:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.rank = rank
        self.faults = [f for f in parse_faults(os.environ.get(FAULT_ENV, ""))
                       if f.rank in (None, rank) and f.restart in (None, restart)]

    def __call__(self, point: str, at: int) -> bool:
        """Inject what is due at ``point`` ``at`` (kill, hang); True if this step's loss is to be made NaN."""
        poison = False
        for fault in self.faults:
            if (fault.point, fault.at) != (point, at):
                continue
            log.warning("%s: %s at %s %d on rank %d", FAULT_ENV, fault.action, point, at, self.rank)
            if fault.action == "kill":
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.action == "hang":
                time.sleep(fault.seconds)
            else:
                poison = True
        return poison


def _poisoned(step_fn: StepFn) -> StepFn:
    """``step_fn`` whose loss is NaN (fault injection), so the gradients are NaN too."""
    def step(model: torch.nn.Module, batch: tuple) -> StepOutput:
        out = step_fn(model, batch)
        out.loss = out.loss * float("nan")
        return out
    return step


def _is_timeout(err: BaseException) -> bool:
    """Whether a distributed error is a collective that outlived the process group's timeout."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


@dataclass
class TrainResult:
    final_step: int
    final_loss: float
    eval_metrics: dict[str, float]
    run_dir: Path
    mlflow_run_id: str | None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _max_over_ranks(value: float, ctx: DistContext) -> float:
    if ctx.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, engine: Engine, loaders: dict[str, Any]) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.engine = engine
        self.train_loader, self.train_state = loaders["train"]
        self.eval_loader = loaders.get("eval")
        self.task = task_for(cfg.model.arch)
        self.run_dir = cfg.run_dir
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_checkpoints,
                                             ctx.rank, ctx.world_size)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.tracker: Tracker | None = None
        self.step = 0
        self.phase = "start-up"  # what the loop is doing, for the collective-timeout message
        self.faults = FaultInjector(ctx.rank)

    # -- set-up --------------------------------------------------------------------

    def _start_tracking(self, resume_run_id: str | None) -> None:
        if not (self.ctx.is_main and self.cfg.tracking.enabled):
            return
        uri = self.cfg.tracking.uri or default_tracking_uri(self.cfg.run.output_dir)
        self.tracker = Tracker(uri, self.cfg.tracking.experiment)
        tags = {"git_commit": _git_commit(), "layout": self.cfg.layout_tag(self.ctx.world_size),
                "world_size": str(self.ctx.world_size),
                "device": self.ctx.device.type, "topology": os.environ.get("TRANSLUTION_TOPOLOGY", "local")}
        run_id = self.tracker.start(self.cfg.run.name, tags, resume_run_id, self.cfg.tracking.system_metrics)
        (self.run_dir / "mlflow_run_id").write_text(run_id)
        if resume_run_id is None:
            self.tracker.log_params(flatten(self.cfg))
            self.tracker.log_artifact(self.run_dir / "config.yaml")
        log.info("MLflow run %s at %s", run_id, uri)

    def _resume(self) -> str | None:
        """Restore the newest good checkpoint; returns the MLflow run to continue, if any."""
        if self.cfg.train.resume == "never":
            return None
        path = self.checkpoints.latest_good()
        if path is None:
            return None
        restored = self.checkpoints.load(path, self.engine.load_state)
        self.step = restored.step
        self.engine.load_scheduler_state(restored.meta["scheduler"])
        if restored.rank_state is not None:
            set_rng_state(restored.rank_state["rng"])
            self.train_state.load_state_dict(restored.rank_state["data"], strict=False)
        else:
            epoch = restored.step * self.cfg.train.grad_accum // self.train_state.batches_per_epoch
            log.warning("checkpoint %s was written at world size %s, now %s: parameters and optimizer are "
                        "resharded; the data streams restart at the start of epoch %d",
                        path, restored.meta.get("world_size"), self.ctx.world_size, epoch)
            self.train_state.epoch = epoch
        if self.ctx.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        run_id_file = self.run_dir / "mlflow_run_id"
        return run_id_file.read_text().strip() if run_id_file.exists() else None

    # -- checkpoints, evaluation, logging ------------------------------------------

    def save_checkpoint(self, final: bool) -> None:
        """Write a checkpoint; a failed one stops the run unless train.on_checkpoint_error=continue and more follow."""
        self.phase = f"checkpoint step {self.step}"
        meta = {"scheduler": self.engine.scheduler_state(), "layout": self.cfg.layout_tag(self.ctx.world_size),
                "config": json.loads(json.dumps(self.cfg.model_dump(mode="json")))}
        rank_state = {"rng": rng_state(), "data": self.train_state.state_dict()}

        def save_state(directory: Path):
            pending = self.engine.save_state(directory, self.cfg.train.async_checkpoint)
            self.faults("checkpoint", self.step)  # the shards are written, the checkpoint is not complete yet
            return pending

        try:
            self.checkpoints.save(self.step, save_state, rank_state, meta)
        except CheckpointError as err:
            if final or self.cfg.train.on_checkpoint_error == "stop":
                log.error("%s; stopping (train.on_checkpoint_error=%s%s)", err, self.cfg.train.on_checkpoint_error,
                          ", and this was the final checkpoint" if final else "")
                raise
            log.error("%s; training goes on as train.on_checkpoint_error=continue", err)

    def _collective_timeout(self, err: RuntimeError) -> CollectiveTimeoutError:
        """Name this rank, the collective, what the loop was doing, and the ranks that stalled."""
        frames = [f.name for f in traceback.extract_tb(err.__traceback__) if f.filename.endswith("distributed_c10d.py")]
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        message = (f"rank {self.ctx.rank} of {self.ctx.world_size}: collective {frames[-1] if frames else '?'} in "
                   f"{self.phase} did not complete within train.collective_timeout_s="
                   f"{self.cfg.train.collective_timeout_s}s ({cause}); {self._silent_ranks()}")
        log.error("%s", message)
        return CollectiveTimeoutError(message)

    def _silent_ranks(self) -> str:
        """Which ranks stalled: those that do not also report a timeout, through torchrun's store, within seconds.

        The process group cannot tell (gloo closes its connections on a timeout), but the ranks
        blocked in the same collective time out together, so the ones that stay silent are the culprits.
        """
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=TIMEOUT_REPORT_S))
            prefix = f"translution/collective_timeout/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            store.set(f"{prefix}/{self.ctx.rank}", self.phase)
            others = [r for r in range(self.ctx.world_size) if r != self.ctx.rank]
            deadline = time.monotonic() + TIMEOUT_REPORT_S
            while True:
                others = [r for r in others if not store.check([f"{prefix}/{r}"])]
                if not others or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        except (KeyError, ValueError, RuntimeError) as err:
            return f"could not ask the other ranks ({err}): look for the rank whose log lacks this error"
        if not others:
            return "every rank timed out, so they waited in different collectives (a desynchronised program)"
        return (f"rank(s) {', '.join(map(str, others))} did not report a timeout within {TIMEOUT_REPORT_S}s: "
                "they stalled or died")

    def evaluate(self) -> dict[str, float]:
        if self.eval_loader is None or self.cfg.train.eval_batches == 0:
            return {}
        self.engine.model.eval()
        sums: dict[str, float] = defaultdict(float)
        for i, batch in enumerate(self.eval_loader):
            if i == self.cfg.train.eval_batches:
                break
            batch = tuple(t.to(self.ctx.device) for t in batch)
            for key, value in self.task.eval_sums(self.engine.model, batch).items():
                sums[key] += value
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.ctx.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(totals)
        return self.task.summarize(dict(zip(keys, totals.tolist())))

    def _log(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.history[key].append((self.step, value))
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, self.step)

    # -- the loop ------------------------------------------------------------------

    def _batches(self):
        """Training batches without end: each ``iter`` of the loader is the rest of one epoch."""
        while True:
            yield from self.train_loader

    def _micro_batches(self, batches) -> list:
        return [tuple(t.to(self.ctx.device, non_blocking=True) for t in next(batches))
                for _ in range(self.cfg.train.grad_accum)]

    def _handle_nonfinite(self, result: StepResult) -> None:
        message = f"step {self.step + 1}: non-finite values ({result.nonfinite})"
        if self.cfg.train.nonfinite_loss == "stop":
            log.error("%s; stopping as train.nonfinite_loss=stop", message)
            raise NonFiniteLossError(message + "; stopping as train.nonfinite_loss=stop")
        log.warning("%s; step skipped as train.nonfinite_loss=skip", message)

    def run(self) -> TrainResult:
        resume_run_id = self._resume()
        self._start_tracking(resume_run_id)
        cfg = self.cfg.train
        batches = self._batches()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.ctx.is_main, desc="train", unit="step",
                   dynamic_ncols=True)
        eval_metrics: dict[str, float] = {}
        last = StepResult(float("nan"), float("nan"), 0, 0, False, None)
        status = "FAILED"
        try:
            while self.step < cfg.steps:
                start = time.perf_counter()
                self.phase = f"training step {self.step + 1}"
                step_fn = _poisoned(self.task.step) if self.faults("step", self.step + 1) else self.task.step
                last = self.engine.train_step(self._micro_batches(batches), step_fn)
                if last.skipped:
                    self._handle_nonfinite(last)
                elapsed = time.perf_counter() - start
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last.loss:.4f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log(self._step_metrics(last, elapsed))
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.steps:
                    self.phase = f"evaluation after step {self.step}"
                    self._log(self.evaluate())
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step != cfg.steps:
                    self.save_checkpoint(final=False)
            self.phase = "final evaluation"
            eval_metrics = self.evaluate()
            self._log(eval_metrics)
            self.save_checkpoint(final=True)
            self.checkpoints.wait()
            self.phase = "model export"
            self._finish_artifacts()
            status = "FINISHED"
        except RuntimeError as err:
            if self.ctx.world_size > 1 and _is_timeout(err):
                raise self._collective_timeout(err) from err
            raise
        finally:
            bar.close()
            if self.tracker is not None:
                self.tracker.finish(status)
        return TrainResult(self.step, last.loss, eval_metrics, self.run_dir,
                           self.tracker.run_id if self.tracker else None, dict(self.history))

    def _step_metrics(self, result: StepResult, elapsed: float) -> dict[str, float]:
        dp = self.ctx.dp_size
        metrics = {
            "loss": result.loss,
            "lr": self.engine.lr(),
            "grad_norm": result.grad_norm,
            "samples_per_s": result.samples * dp / elapsed,
            "tokens_per_s": result.tokens * dp / elapsed,
            "step_time_s": elapsed,
            "peak_memory_gib_rank0": _peak_memory_bytes(self.ctx.device) / 2**30,
        }
        metrics["peak_memory_gib_max"] = _max_over_ranks(metrics["peak_memory_gib_rank0"], self.ctx)
        metrics.update(self.train_state.metrics())
        return metrics

    def _finish_artifacts(self) -> None:
        """Plots and the consolidated model; gathering the model is collective."""
        export = self.cfg.tracking.enabled and self.cfg.tracking.log_model
        state = self.engine.full_model_state() if export else None
        if self.tracker is None:
            return
        artifacts = self.run_dir / "artifacts"
        artifacts.mkdir(exist_ok=True)
        curves = {k: v for k, v in self.history.items() if k in ("loss", "lr", "grad_norm") or k.startswith("eval_")}
        self.tracker.log_artifact(plot_history(curves, artifacts / "curves.png", self.cfg.run.name), "plots")
        if state is not None:
            from safetensors.torch import save_file

            path = artifacts / "model.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            self.tracker.log_artifact(path, "model")
            if self.cfg.tracking.register_model:
                self.tracker.register_model("model", self.cfg.tracking.register_model)


def write_run_dir(cfg: Config, ctx: DistContext) -> None:
    """Create the run directory and record the resolved config (rank 0), before any state is written.

    A directory that cannot be written is a config error on every rank (exit code 2), found before training.
    """
    error = None
    if ctx.is_main:
        try:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
        except OSError as err:
            error = (f"run.output_dir: cannot write the run directory {cfg.run_dir} ({err.strerror or err}); "
                     "choose a writable run.output_dir")
    if ctx.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ConfigError(error)
