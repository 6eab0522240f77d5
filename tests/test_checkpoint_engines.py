"""One checkpoint format for every engine: DeepSpeed ZeRO-3 ↔ FSDP2 ↔ one process, and DeepSpeed resized.

A tiny ViT trains 2 of 4 steps under one engine, is checkpointed through the trainer's
``CheckpointManager`` and the backend's ``save_state``, and goes on for its last 2 steps.
Another engine (or world size) resumes the checkpoint and takes the same 2 steps on the same
global batches (a data-parallel rank takes its rows, one process all of them).

* At the handover the resumed fp32 parameters, AdamW moments and step equal the written ones
  bit for bit (and DeepSpeed's working copies equal its fp32 master).
* The next 2 losses equal the writer's own within rel 1e-5. They are the same math summed in
  another order: DeepSpeed reduces gradients over ranks and updates flat partitions, FSDP2
  reduce-scatters, one process sums a batch of 8 at once. The first loss only sees the loaded
  weights; the second also the loaded moments, step and learning rate. 1e-5 is the tolerance
  DeepSpeed already meets against one process over 3 steps (``test_parallel_deepspeed``).

The two written checkpoints are module fixtures shared by the tests: 60–90 s in all on 2 busy
CPU cores, 7–20 s per group of processes, DeepSpeed's start-up most of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from helpers.processes import prepare_deepspeed_on_cpu, run_in_processes, tiny_batch
from launcher.cli import main
from test_parallel_fsdp import MICRO_BATCH, tiny_config
from training.backend import DistContext, TrainingBackend
from training.checkpoint import deepspeed_state
from training.checkpoint.deepspeed_state import MOMENTS, adam_step, trainable
from training.checkpoint.store import CheckpointManager
from training.config import Config
from training.deepspeed_backend import DeepSpeedBackend
from training.run import build_backend, setup
from training.tasks import task_for

prepare_deepspeed_on_cpu()  # the tests run on CPU over gloo

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

MODEL = tiny_config("vit", "translution", 2)
STEPS, RESUME_AT = 4, 2
RANKS = 2  # the global batch is that of 2 data-parallel ranks, whatever the layout
DEEPSPEED = {"engine": "deepspeed", "offload_param": "cpu", "offload_optimizer": "cpu", "backend": "gloo"}
FSDP = {"engine": "fsdp", "dp_shard": -1, "backend": "gloo"}
NONE = {"engine": "none"}
TP = {"engine": "none", "tp": 2, "backend": "gloo"}


def _config(parallel: dict[str, Any], root: Path) -> Config:
    return Config.model_validate({
        "run": {"name": "run", "output_dir": str(root), "seed": 0}, "model": MODEL.model_dump(),
        "data": {"kind": "synthetic"}, "parallel": parallel,
        "train": {"steps": STEPS, "micro_batch_size": MICRO_BATCH},
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "grad_clip": 0.5}, "tracking": {"enabled": False}})


def _train(backend: TrainingBackend, ctx: DistContext, steps: range) -> list[float]:
    """The global batch of each step (seeded by the step), this rank's rows of it; the mean loss of each."""
    losses = []
    for step in steps:
        x, y = tiny_batch(MODEL, MICRO_BATCH * RANKS, seed=step)
        rows = slice(ctx.dp_rank * len(x) // ctx.dp_size, (ctx.dp_rank + 1) * len(x) // ctx.dp_size)
        losses.append(backend.train_step([(x[rows], y[rows])], task_for(MODEL.arch).step).loss)
    return losses


def _full_state(backend: TrainingBackend) -> dict[str, Any]:
    """Every fp32 parameter and AdamW moment whole, and the step (collective)."""
    if isinstance(backend, DeepSpeedBackend):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        named = trainable(backend.engine)
        state = {"param": {name: safe_get_full_fp32_param(p).clone() for name, p in named},
                 "step": {adam_step(backend.engine)}}
        for key in MOMENTS:
            state[key] = {name: safe_get_full_optimizer_state(p, key).clone() for name, p in named}
        return state
    model, optim = get_state_dict(backend.model, backend.optimizer, options=StateDictOptions(full_state_dict=True))
    state = {"param": {name: value.clone() for name, value in model.items()},
             "step": {float(s["step"]) for s in optim["state"].values()}}
    for key in MOMENTS:
        state[key] = {name: s[key].clone() for name, s in optim["state"].items()}
    return state


def _assert_working_copies_are_the_master(backend: DeepSpeedBackend) -> None:
    """What DeepSpeed's forward gathers equals the fp32 master loaded into it (fp32 run)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(backend.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            assert torch.equal(p.detach(), safe_get_full_fp32_param(p)), p.ds_summary()


def _checkpointed_run(rank: int, world: int, parallel: dict[str, Any], root: str) -> dict[str, Any]:
    """Train to step 2, checkpoint under ``root``, train to step 4: the written state and the last losses."""
    cfg = _config(parallel, Path(root))
    ctx = setup(cfg)
    backend = build_backend(cfg, ctx)
    _train(backend, ctx, range(RESUME_AT))
    meta = {"scheduler": backend.scheduler_state(), "layout": ctx.dims.tag(cfg.model.bank_chunks),
            "config": cfg.model_dump(mode="json")}
    manager = CheckpointManager(cfg.run_dir / "checkpoints", keep=1, rank=rank, world_size=world)
    manager.save(RESUME_AT, lambda directory: backend.save_state(directory, False), {}, meta)
    return {"state": _full_state(backend), "losses": _train(backend, ctx, range(RESUME_AT, STEPS))}


def _resumed_run(rank: int, world: int, parallel: dict[str, Any], run_dir: str,
                 load_batch_bytes: int = deepspeed_state.LOAD_BATCH_BYTES) -> dict[str, Any]:
    """Resume ``run_dir``'s checkpoint: the state loaded and the losses of the steps after it."""
    deepspeed_state.LOAD_BATCH_BYTES = load_batch_bytes
    cfg = _config(parallel, Path(run_dir).parent)  # the same run, another layout
    ctx = setup(cfg)
    backend = build_backend(cfg, ctx)
    manager = CheckpointManager(cfg.run_dir / "checkpoints", keep=1, rank=rank, world_size=world)
    restored = manager.load(manager.latest_good(), backend.load_state)
    backend.load_scheduler_state(restored.meta["scheduler"])
    if isinstance(backend, DeepSpeedBackend):
        _assert_working_copies_are_the_master(backend)
    return {"state": _full_state(backend), "losses": _train(backend, ctx, range(restored.step, STEPS))}


def _assert_continues(written: dict[str, Any], resumed: dict[str, Any]) -> None:
    for key in ("param", *MOMENTS):
        assert resumed["state"][key].keys() == written["state"][key].keys(), key
        for name, value in written["state"][key].items():
            assert torch.equal(resumed["state"][key][name], value), f"{key} of {name}"
    assert resumed["state"]["step"] == written["state"]["step"] == {float(RESUME_AT)}
    assert resumed["losses"] == pytest.approx(written["losses"], rel=1e-5)


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """DeepSpeed ZeRO-3 ×2 (parameters and optimizer offloaded to CPU): its run directory and rank 0's record."""
    root = tmp_path_factory.mktemp("deepspeed")
    record = run_in_processes(_checkpointed_run, 2, DEEPSPEED, str(root))[0]
    return root / "run", record


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fsdp")
    record = run_in_processes(_checkpointed_run, 2, FSDP, str(root))[0]
    return root / "run", record


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_deepspeed_checkpoint_resumes_in_one_process(deepspeed_run):
    run_dir, written = deepspeed_run
    _assert_continues(written, _resumed_run(0, 1, NONE, str(run_dir)))


@pytest.mark.multiprocess
def test_deepspeed_checkpoint_resumes_under_fsdp2(deepspeed_run):
    run_dir, written = deepspeed_run
    _assert_continues(written, run_in_processes(_resumed_run, 2, FSDP, str(run_dir))[0])


@pytest.mark.multiprocess
def test_deepspeed_checkpoint_resumes_at_another_world_size(deepspeed_run):
    """One DeepSpeed rank, reading one parameter per ``dcp.load`` (a 1-byte batch budget)."""
    run_dir, written = deepspeed_run
    _assert_continues(written, run_in_processes(_resumed_run, 1, DEEPSPEED, str(run_dir), 1)[0])


@pytest.mark.multiprocess
def test_fsdp2_checkpoint_resumes_under_deepspeed(fsdp_run):
    run_dir, written = fsdp_run
    _assert_continues(written, run_in_processes(_resumed_run, 2, DEEPSPEED, str(run_dir))[0])


@pytest.mark.multiprocess
def test_fsdp2_checkpoint_resumes_under_tensor_parallelism_without_fsdp(fsdp_run):
    """tp=2 alone keeps some parameters plain beside the DTensors: still one param group, as written."""
    run_dir, written = fsdp_run
    _assert_continues(written, run_in_processes(_resumed_run, 2, TP, str(run_dir))[0])


@pytest.mark.multiprocess
def test_deepspeed_and_fsdp2_write_the_same_entries(deepspeed_run, fsdp_run):
    def entries(run_dir: Path) -> dict[str, Any]:
        metadata = FileSystemReader(str(run_dir / "checkpoints" / "step_00000002" / "dcp")).read_metadata()
        return {key: getattr(value, "size", None) for key, value in metadata.state_dict_metadata.items()}

    assert entries(deepspeed_run[0]) == entries(fsdp_run[0])


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_ckpt_tools_read_a_deepspeed_checkpoint(deepspeed_run, tmp_path, capsys):
    run_dir, written = deepspeed_run
    assert main(["ckpt", "inspect", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["step"], report["world_size"]) == (RESUME_AT, 2)
    assert report["totals"]["optim"]["tensors"] == 3 * report["totals"]["model"]["tensors"]
    out = tmp_path / "model.safetensors"
    assert main(["ckpt", "export", str(run_dir), "--out", str(out)]) == 0
    exported = load_file(out)
    assert exported.keys() == written["state"]["param"].keys()
    assert all(torch.equal(exported[name], value) for name, value in written["state"]["param"].items())
