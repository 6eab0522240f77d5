"""Test helpers for the parallel layouts: real gloo processes, and a single-process reference.

:func:`run_in_processes` gives each process torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins through
:func:`parallelism.mesh.init_distributed`, so tests exercise the start-up path of a launched
run. :func:`compare_with_single_process` is the check every layout must pass: the same
losses, gradients and weights as the unsharded model, step after step.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.distributed.tensor import DTensor

from parallelism import ParallelDims, parallelize
from parallelism.compile import apply_compile
from parallelism.config import ParallelConfig
from parallelism.mesh import build_mesh, finish_collectives, init_distributed
from translution_dist.models import ModelConfig, build_model


def prepare_deepspeed_on_cpu() -> None:
    """DeepSpeed's CPU accelerator, its JIT-built ops cached in the repository's ``.venv`` (call before importing it)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    venv = Path(__file__).resolve().parents[2] / ".venv"
    if venv.is_dir():
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(venv / "torch_extensions"))


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, timeout_s: float, args: tuple,
           procs_per_node: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % procs_per_node), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(procs_per_node), GROUP_RANK=str(rank // procs_per_node),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    init_distributed(ParallelConfig(backend="gloo"), timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        finish_collectives()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_in_processes(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300,
                     procs_per_node: int | None = None) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each call in its own gloo process.

    ``procs_per_node`` simulates several nodes as torchrun numbers them: consecutive ranks share
    a node (``GROUP_RANK``), ``LOCAL_RANK`` counts within it; default: one node.

    ``fn`` must be importable (a module-level function) and its result picklable. An
    exception in any process is re-raised here with that process's traceback; a collective
    stuck longer than ``timeout_s`` fails instead of hanging. As under torchrun, this process
    hosts the rendezvous store (on a port the OS picks, so concurrent runs never collide) and
    the workers join it as clients.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.start_processes(
            _entry, args=(fn, world_size, store.port, out_dir, timeout_s, args, procs_per_node or world_size),
            nprocs=world_size,
            start_method="spawn")
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def tiny_batch(cfg: ModelConfig, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` for ``cfg``: random images and labels, or a random token window."""
    generator = torch.Generator().manual_seed(seed)
    if cfg.arch == "vit":
        images = torch.randn(batch_size, cfg.channels, *cfg.image_hw, generator=generator)
        return images, torch.randint(cfg.num_classes, (batch_size,), generator=generator)
    tokens = torch.randint(cfg.vocab_size, (batch_size, cfg.context_length + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_close(actual: Tensor, expected: Tensor, what: str, tol: float) -> float:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
    return float((actual - expected).abs().max()) if actual.numel() else 0.0


def compare_with_single_process(rank: int, world_size: int, model_fields: dict, parallel_fields: dict,
                                steps: int = 3, tol: float = 1e-5, checkpoint_dir: str | None = None,
                                compile_backend: str | None = None) -> dict:
    """Train a parallelized model and the same model in this process side by side; assert they agree.

    Both start from the same seed and take ``steps`` AdamW steps on the same batches; every
    step's loss, every gradient (gathered with ``full_tensor``) and the final weights must
    match within ``tol``. Returns the largest differences seen; with ``checkpoint_dir``, the
    parallel model is saved there with DCP and the result holds the reference's final
    ``state_dict`` under ``"reference_state"``. With ``compile_backend`` the parallel model's
    blocks are compiled (:func:`parallelism.compile.apply_compile`) after sharding, as the
    trainer does, and the result holds the number of graphs traced under ``"graphs"``.
    """
    model_config = ModelConfig(**model_fields)
    dims = ParallelDims.resolve(ParallelConfig(**parallel_fields), world_size)
    torch.manual_seed(0)
    reference = build_model(model_config)
    model = copy.deepcopy(reference)
    parallelize(model, dims, build_mesh(dims, "cpu"))
    counter = None
    if compile_backend is not None:
        counter = CompileCounterWithBackend(compile_backend)
        apply_compile(model, backend=counter)
    # eps well above fp32 noise: Adam's first steps are ~lr·sign(g), which a 1e-8 difference in a
    # near-zero gradient could flip.
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-4, foreach=False) for m in (reference, model)]
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for step in range(steps):
        batch = tiny_batch(model_config, batch_size=2, seed=step)
        losses = []
        for m in (reference, model):
            loss = cross_entropy(m, batch)
            loss.backward()
            losses.append(loss.detach())
        worst["loss"] = max(worst["loss"], _assert_close(losses[1], losses[0], f"step {step} loss", tol))
        expected = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if expected[name].grad is None:
                assert p.grad is None, f"step {step}: {name} has a gradient only in the parallel model"
                continue
            error = _assert_close(_full(p.grad), expected[name].grad, f"step {step} grad of {name}", tol)
            worst["grad"] = max(worst["grad"], error)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        worst["param"] = max(worst["param"], _assert_close(_full(p.detach()), expected[name].detach(), name, tol))
    if checkpoint_dir is not None:
        dcp.save(model.state_dict(), checkpoint_id=checkpoint_dir)
        return {**worst, "reference_state": reference.state_dict()}
    return worst if counter is None else {**worst, "graphs": counter.frame_count}


def compare_cases(rank: int, world_size: int, cases: dict[str, dict[str, Any]]) -> dict[str, dict | str]:
    """:func:`compare_with_single_process` for each named case (a dict of its keyword arguments).

    A failed comparison is returned as its message (the ranks fail alike, since they compare
    gathered tensors), so one spawn checks many cases and reports each.
    """
    results: dict[str, dict | str] = {}
    for name, kwargs in cases.items():
        try:
            results[name] = compare_with_single_process(rank, world_size, **kwargs)
        except AssertionError as err:
            results[name] = str(err)
    return results
