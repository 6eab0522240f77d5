"""The training loop: step → metrics → MLflow (rank 0) → checkpoint every k steps, and on SIGTERM or SIGINT.

:class:`Trainer` runs in every process once ``training.run`` has set up the process group,
the sharded model's backend and the data. It resumes from the newest good checkpoint of the
run directory and trains; fault injection and stall diagnosis are wrappers the run installs
around it (:mod:`training.faults`, :mod:`training.stall`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from training.backend import DistContext, StepResult, TrainingBackend, compute_dtype
from training.checkpoint.safetensors_file import TensorEntry, write_safetensors
from training.checkpoint.store import CheckpointError, CheckpointManager, rng_state, set_rng_state
from training.config import Config, flatten
from training.hardware import device_peak_flops
from training.plots import plot_history
from training.preemption import Stopped, StopRequest
from training.tasks import task_for
from training.tracking import Tracker, default_tracking_uri
from translution_dist.models.flops import model_flops_per_sample

log = logging.getLogger("translution.train")


class NonFiniteLossError(RuntimeError):
    """The loss or gradients became NaN/inf and the config says to stop."""


class ArtifactError(RuntimeError):
    """The plots or the exported model could not be written (a full disk); the final checkpoint is complete."""


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
        root = Path(__file__).resolve().parents[1]
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
    """The loop over one training backend: resume, step, log, evaluate, checkpoint, export."""

    def __init__(self, cfg: Config, ctx: DistContext, backend: TrainingBackend, loaders: dict[str, Any]) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.backend = backend
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
        # MFU as torchtitan logs it: the model's FLOPs (no recomputation) over every rank's peak.
        self.model_flops_per_sample = model_flops_per_sample(cfg.model)
        self.peak_flops, self.peak_flops_source = device_peak_flops(
            cfg.cluster.hardware, ctx.device, compute_dtype(cfg.train.precision, ctx.device))
        if ctx.is_main:
            log.info("MFU counts %.3g FLOPs per sample against %.3g FLOP/s per device (%s)",
                     self.model_flops_per_sample, self.peak_flops, self.peak_flops_source)

    # -- set-up --------------------------------------------------------------------

    def _start_tracking(self, resume_run_id: str | None) -> None:
        if not (self.ctx.is_main and self.cfg.tracking.enabled):
            return
        uri = self.cfg.tracking.uri or default_tracking_uri(self.cfg.run.output_dir)
        self.tracker = Tracker(uri, self.cfg.tracking.experiment)
        tags = {"git_commit": _git_commit(), "layout": self.ctx.dims.tag(self.cfg.model.bank_chunks),
                "world_size": str(self.ctx.world_size),
                "device": self.ctx.device.type, "topology": os.environ.get("TRANSLUTION_TOPOLOGY", "local"),
                "peak_flops_per_device": f"{self.peak_flops:.4g}", "peak_flops_source": self.peak_flops_source}
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
        restored = self.checkpoints.load(path, self.backend.load_state)
        self.step = restored.step
        self.backend.load_scheduler_state(restored.meta["scheduler"])
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
        meta = {"scheduler": self.backend.scheduler_state(), "layout": self.ctx.dims.tag(self.cfg.model.bank_chunks),
                "config": json.loads(json.dumps(self.cfg.model_dump(mode="json")))}
        rank_state = {"rng": rng_state(), "data": self.train_state.state_dict()}

        def save_state(directory: Path):
            return self.backend.save_state(directory, self.cfg.train.async_checkpoint)

        try:
            self.checkpoints.save(self.step, save_state, rank_state, meta)
        except CheckpointError as err:
            if final or self.cfg.train.on_checkpoint_error == "stop":
                log.error("%s; stopping (train.on_checkpoint_error=%s%s)", err, self.cfg.train.on_checkpoint_error,
                          ", and this was the final checkpoint" if final else "")
                raise
            log.error("%s; training goes on as train.on_checkpoint_error=continue", err)

    def evaluate(self) -> dict[str, float]:
        if self.eval_loader is None or self.cfg.train.eval_batches == 0:
            return {}
        self.backend.model.eval()
        sums: dict[str, float] = defaultdict(float)
        for i, batch in enumerate(self.eval_loader):
            if i == self.cfg.train.eval_batches:
                break
            batch = tuple(t.to(self.ctx.device) for t in batch)
            for key, value in self.task.eval_sums(self.backend.model, batch).items():
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
        # A progress bar only on a terminal: in a log file (torchrun --log-dir, a pod's log, a pipe) each of its
        # redraws is one more line, so there rank 0 logs one line every train.log_every steps instead.
        progress_bar = self.ctx.is_main and sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress_bar, desc="train", unit="step",
                   dynamic_ncols=True)
        eval_metrics: dict[str, float] = {}
        last = StepResult(float("nan"), float("nan"), 0, 0, False, None)
        postfix: dict[str, str] = {}
        status = "FAILED"
        try:
            with StopRequest(self.ctx) as stop_request:
                while self.step < cfg.steps:
                    start = time.perf_counter()
                    self.phase = f"training step {self.step + 1}"
                    last = self.backend.train_step(self._micro_batches(batches), self.task.step)
                    if last.skipped:
                        self._handle_nonfinite(last)
                    elapsed = time.perf_counter() - start
                    self.step += 1
                    self.checkpoints.poll()
                    postfix["loss"] = f"{last.loss:.4f}"
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        metrics = self._step_metrics(last, elapsed)
                        self._log(metrics)
                        postfix.update(tokens_per_s=f"{metrics['tokens_per_s']:.4g}", mfu=f"{metrics['mfu']:.1%}")
                        if self.ctx.is_main and not progress_bar:
                            log.info("step %d/%d: loss %.4f, %s tokens/s, MFU %s", self.step, cfg.steps,
                                     last.loss, postfix["tokens_per_s"], postfix["mfu"])
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)  # one redraw per step, with the new postfix
                    if signum := stop_request.agreed():
                        self._stop(signum)
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
        except Stopped:
            status = "KILLED"
            raise
        finally:
            bar.close()
            if self.tracker is not None:
                self.tracker.finish(status)
        return TrainResult(self.step, last.loss, eval_metrics, self.run_dir,
                           self.tracker.run_id if self.tracker else None, dict(self.history))

    def _stop(self, signum: int) -> None:
        """Checkpoint this step synchronously and raise :class:`Stopped` (every rank, the same step)."""
        log.warning("rank %d: %s: stopping after step %d with a checkpoint; run the same command again to resume",
                    self.ctx.rank, signal.Signals(signum).name, self.step)
        self.save_checkpoint(final=True)
        self.checkpoints.wait()
        raise Stopped(signum, self.step)

    def _step_metrics(self, result: StepResult, elapsed: float) -> dict[str, float]:
        samples = result.samples * self.ctx.dp_size  # tp/dispp peers share their data-parallel rank's samples
        metrics = {
            "loss": result.loss,
            "lr": self.backend.lr(),
            "grad_norm": result.grad_norm,
            "samples_per_s": samples / elapsed,
            "tokens_per_s": result.tokens * self.ctx.dp_size / elapsed,
            "mfu": self.model_flops_per_sample * samples / (elapsed * self.ctx.world_size * self.peak_flops),
            "step_time_s": elapsed,
            "peak_memory_gib_rank0": _peak_memory_bytes(self.ctx.device) / 2**30,
        }
        metrics["peak_memory_gib_max"] = _max_over_ranks(metrics["peak_memory_gib_rank0"], self.ctx)
        metrics.update(self.train_state.metrics())
        return metrics

    def _finish_artifacts(self) -> None:
        """Plots and the consolidated model; gathering the model is collective, and so is a failure to write them.

        Each file is written under a temporary name and renamed, so a full disk leaves no partial file;
        every rank then raises the same :class:`ArtifactError`, which names the complete final checkpoint
        to export the model from once there is space.
        """
        export = self.cfg.tracking.enabled and self.cfg.tracking.log_model
        state = self.backend.full_model_state() if export else None
        error = None
        if self.tracker is not None:
            artifacts = self.run_dir / "artifacts"
            try:
                self._write_artifacts(artifacts, state)
            except OSError as err:
                error = (f"writing the run's artifacts under {artifacts} failed: {err.strerror or err}"
                         f"{_free_space(artifacts)}; no partial file was left. The final checkpoint is complete: "
                         f"free space, then `translution ckpt export {self.run_dir} --out model.safetensors`")
        if self.ctx.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise ArtifactError(error)

    def _write_artifacts(self, artifacts: Path, state: dict[str, torch.Tensor] | None) -> None:
        assert self.tracker is not None
        artifacts.mkdir(exist_ok=True)
        curves = {k: v for k, v in self.history.items() if k in ("loss", "lr", "grad_norm") or k.startswith("eval_")}
        self.tracker.log_artifact(plot_history(curves, artifacts / "curves.png", self.cfg.run.name), "plots")
        if state is not None:
            path = artifacts / "model.safetensors"
            tensors = [(name, t.detach().cpu().contiguous()) for name, t in state.items()]
            write_safetensors(path, [TensorEntry(name, tuple(t.shape), t.dtype) for name, t in tensors], tensors,
                              {"format": "pt"})
            self.tracker.log_artifact(path, "model")
            if self.cfg.tracking.register_model:
                self.tracker.register_model("model", self.cfg.tracking.register_model)


def _free_space(directory: Path) -> str:
    try:
        return f" ({shutil.disk_usage(directory).free} bytes free under {directory})"
    except OSError:
        return ""
