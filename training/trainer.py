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
from training.provenance import RUN_TOKENIZER, data_files, dataset_records, git_state, host_tags
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
        self.checkpointed_step = 0  # the step whose checkpoint is on disk (0: none needed, nothing trained yet)
        self.stop_request = StopRequest(ctx)
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
        tags = {**git_state(), **host_tags(), "layout": self.ctx.dims.tag(self.cfg.model.bank_chunks),
                "engine": self.ctx.dims.engine, "world_size": str(self.ctx.world_size),
                "device": self.ctx.device.type, "topology": os.environ.get("TRANSLUTION_TOPOLOGY", "local"),
                "peak_flops_per_device": f"{self.peak_flops:.4g}", "peak_flops_source": self.peak_flops_source}
        run_id = self.tracker.start(self.cfg.run.name, tags, resume_run_id, self.cfg.tracking.system_metrics)
        (self.run_dir / "mlflow_run_id").write_text(run_id)
        self.tracker.record_segment(flatten(self.cfg), self.run_dir / "config.yaml", self.step)
        self.tracker.log_datasets(dataset_records(self.cfg.data, ["train", "test"] if self.eval_loader else ["train"]))
        for path in data_files(self.cfg.data):
            self.tracker.log_artifact(path, "data")
        log.info("MLflow run %s at %s", run_id, uri)

    def _resume(self) -> str | None:
        """Restore the newest good checkpoint; returns the MLflow run to continue, if any."""
        if self.cfg.train.resume == "never":
            return None
        path = self.checkpoints.latest_good()
        if path is None:
            return None
        restored = self.checkpoints.load(path, self.backend.load_state)
        self.step = self.checkpointed_step = restored.step
        self.backend.load_scheduler_state(restored.meta["scheduler"])
        if restored.rank_state is not None:
            set_rng_state(restored.rank_state["rng"])
        # The data position is global (meta.json); checkpoints before it kept one per rank.
        data = restored.meta.get("data") or (restored.rank_state or {}).get("data")
        if data is not None:
            self.train_state.load_state_dict(data, strict=False)
        else:
            log.warning("checkpoint %s holds no data position readable at world size %s (it was written at %s, "
                        "before positions were global): the data starts at epoch 0",
                        path, self.ctx.world_size, restored.meta.get("world_size"))
        if restored.rank_state is None:
            log.warning("checkpoint %s was written at world size %s, now %s: parameters and optimizer are "
                        "resharded; the data resumes at %s", path, restored.meta.get("world_size"),
                        self.ctx.world_size, self.train_state.describe())
        if self.ctx.is_main:
            log.info("resumed from %s at step %d, data at %s", path, self.step, self.train_state.describe())
        run_id_file = self.run_dir / "mlflow_run_id"
        return run_id_file.read_text().strip() if run_id_file.exists() else None

    # -- checkpoints, evaluation, logging ------------------------------------------

    def save_checkpoint(self, final: bool) -> None:
        """Write a checkpoint; a failed one stops the run unless train.on_checkpoint_error=continue and more follow."""
        self.phase = f"checkpoint step {self.step}"
        meta = {"scheduler": self.backend.scheduler_state(), "layout": self.ctx.dims.tag(self.cfg.model.bank_chunks),
                "config": json.loads(json.dumps(self.cfg.model_dump(mode="json"))),
                "data": self.train_state.state_dict()}  # the same on every rank, read at any world size
        rank_state = {"rng": rng_state()}

        def save_state(directory: Path):
            return self.backend.save_state(directory, self.cfg.train.async_checkpoint)

        try:
            self.checkpoints.save(self.step, save_state, rank_state, meta)
            self.checkpointed_step = self.step  # an asynchronous save is completed (or fails) before any load
        except CheckpointError as err:
            if final or self.cfg.train.on_checkpoint_error == "stop":
                log.error("%s; stopping (train.on_checkpoint_error=%s%s)", err, self.cfg.train.on_checkpoint_error,
                          ", and this was the final checkpoint" if final else "")
                raise
            log.error("%s; training goes on as train.on_checkpoint_error=continue", err)

    def evaluate(self) -> dict[str, float]:
        """Metrics over ``train.eval_batches`` test batches; a stop signal is honoured after each batch."""
        if self.eval_loader is None or self.cfg.train.eval_batches == 0:
            return {}
        sums: dict[str, float] = defaultdict(float)
        for i, batch in enumerate(self.eval_loader):
            if i == self.cfg.train.eval_batches:
                break
            batch = tuple(t.to(self.ctx.device) for t in batch)
            for key, value in self.backend.eval_sums(batch, self.task.eval_sums).items():
                sums[key] += value
            self._stop_if_asked()
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
        with self.stop_request:  # from start-up on: a signal while resuming counts too
            return self._run()

    def _run(self) -> TrainResult:
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
            self._stop_if_asked()
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
                self._stop_if_asked()
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
            self._stop_if_asked()
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

    def _stop_if_asked(self) -> None:
        """Stop here if any rank got a stop signal (collective: every rank calls it at the same point).

        The state of this step is checkpointed synchronously unless a complete checkpoint of it
        exists already (a stop after a periodic or the final checkpoint, or before the first step).
        """
        signum = self.stop_request.agreed()
        if not signum:
            return
        log.warning("rank %d: %s: stopping after step %d with a checkpoint; run the same command again to resume",
                    self.ctx.rank, signal.Signals(signum).name, self.step)
        self.checkpoints.wait()
        if self.step != self.checkpointed_step:
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
            if (self.run_dir / RUN_TOKENIZER).is_file():  # what turns the model's token ids into text
                self.tracker.log_artifact(self.run_dir / RUN_TOKENIZER, "model")
            if self.cfg.tracking.register_model:
                self.tracker.register_model("model", self.cfg.tracking.register_model)


def _free_space(directory: Path) -> str:
    try:
        return f" ({shutil.disk_usage(directory).free} bytes free under {directory})"
    except OSError:
        return ""
