"""ZeRO-3 with DeepSpeed (optionally ZeRO-Infinity: parameters/optimizer state on CPU or NVMe).

The second engine beside FSDP2, driven from the same model code and ``ParallelConfig``. The
model is constructed under ``deepspeed.zero.Init``, so every module's parameters are
partitioned as soon as that module is built (each rank briefly holds one module's weights,
one bank chunk side or one plain layer, never the model), and the random initialisation
equals the single-process one of the same seed: every rank draws the full tensor, then keeps
its part. Nothing here gathers the whole model on one rank; the trainer's checkpoints of this
engine are the DCP checkpoints of the others (``training.checkpoint.deepspeed_state``).

Gather granularity: DeepSpeed fetches a module's *own* parameters in its forward, but a bank
chunk uses the weights of its ``DisplacementBank`` children without calling them, so the
chunks are declared ZeRO-3 *leaf* modules: a chunk gathers all its banks on entry and frees
them on exit. The ZeRO-3 settings keep it at one chunk (see :func:`deepspeed_config`).

On a machine without an accelerator DeepSpeed runs on its CPU accelerator
(``DS_ACCELERATOR=cpu``) over gloo. Its first run JIT-compiles C++ ops (the shared-memory
communication op, and ``DeepSpeedCPUAdam`` when that optimizer is used) into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later runs load them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn

from translution_dist.models.attention import ScoreBankChunk, ValueBankChunk, bank_chunk_modules

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from parallelism.config import ParallelConfig

Precision = Literal["fp32", "bf16", "fp16"]

DEFAULT_PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's default: parameters of at most this many elements stay gathered on every rank."""
DEFAULT_NVME_BUFFER = 100_000_000
"""DeepSpeed's default NVMe swap buffer (elements); one buffer must hold the largest parameter."""


class AdamWSettings(Protocol):
    """The optimizer fields the config needs (``training.config.OptimSection`` has them)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float | None


class DeepSpeedLayout(Protocol):
    """The :class:`ParallelConfig` fields this module reads (``ParallelConfig`` refuses tp,
    dispp and dp_replicate > 1 with this engine: DeepSpeed shards plain tensors over all ranks)."""

    offload_param: str
    offload_optimizer: str
    nvme_path: str | None
    backend: str


@dataclass(frozen=True)
class ParameterSizes:
    """Element counts of a model that the ZeRO-3 settings depend on (measured on meta)."""

    largest_parameter: int
    smallest_bank_parameter: int | None


def parameter_sizes(model: nn.Module) -> ParameterSizes:
    """Sizes of ``model``'s parameters and bank chunks; works on the meta device."""
    banks = [p.numel() for chunk in bank_chunk_modules(model) for p in chunk.parameters()]
    return ParameterSizes(
        largest_parameter=max(p.numel() for p in model.parameters()),
        smallest_bank_parameter=min(banks) if banks else None,
    )


def _offload(device: str, nvme_path: str | None, **extra: Any) -> dict[str, Any]:
    if device == "none":
        return {"device": "none"}
    entry: dict[str, Any] = {"device": device, "pin_memory": torch.cuda.is_available()}
    if device == "nvme":
        if not nvme_path:
            raise ValueError("offload to nvme needs parallel.nvme_path (a directory on a local NVMe drive)")
        entry.update(nvme_path=str(nvme_path), **extra)
    return entry


def deepspeed_config(parallel: ParallelConfig | DeepSpeedLayout, optim: AdamWSettings, *, micro_batch_size: int,
                     grad_accum: int, sizes: ParameterSizes, precision: Precision = "fp32", cpu_adam: bool = True,
                     prefetch_numel: int = 0) -> dict[str, Any]:
    """The DeepSpeed config dict of a ZeRO-3 run.

    Settings that keep the gathered bank at one chunk:

    * ``stage3_param_persistence_threshold`` below the smallest bank parameter: a persistent
      parameter is never partitioned, and the default (1e5 elements) would keep every bank of
      a small model whole on every rank. Small non-bank parameters stay persistent.
    * ``stage3_max_reuse_distance = 0``: a parameter is released right after its module, even
      if it is used again soon (the default keeps the last chunks gathered from the end of
      forward into backward).
    * ``stage3_prefetch_bucket_size = prefetch_numel`` (0 by default): prefetching gathers the
      next modules' parameters while the current one computes, so chunks are fetched while
      another is live. A positive value buys overlap for up to that many more elements.
    * ``stage3_max_live_parameters`` is left at its default: DeepSpeed 0.19 consults it only
      to cap prefetching, which is off.

    ``precision`` bf16/fp16 is DeepSpeed's own mixed precision (low-precision weights and
    compute, fp32 master weights in the optimizer), e.g. from ``train.precision``.

    With NVMe parameter offload, each swap buffer must hold the largest parameter, so
    ``buffer_size`` grows to it (the ``aio`` settings keep DeepSpeed's defaults).

    ``cpu_adam`` picks DeepSpeedCPUAdam (a JIT-built, vectorised kernel) for an offloaded
    optimizer; otherwise, and on a machine without CUDA, the step is ``torch.optim.AdamW``
    (``torch_adam``).
    """
    offloaded = parallel.offload_optimizer != "none"
    torch_adam = not cpu_adam if offloaded else not torch.cuda.is_available()
    threshold = DEFAULT_PERSISTENCE_THRESHOLD
    if sizes.smallest_bank_parameter is not None:
        threshold = min(threshold, sizes.smallest_bank_parameter - 1)
    zero: dict[str, Any] = {
        "stage": 3,
        "offload_param": _offload(parallel.offload_param, parallel.nvme_path,
                                  buffer_size=max(DEFAULT_NVME_BUFFER, sizes.largest_parameter)),
        "offload_optimizer": _offload(parallel.offload_optimizer, parallel.nvme_path),
        "stage3_param_persistence_threshold": threshold,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": prefetch_numel,
    }
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip or 0.0,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            "torch_adam": torch_adam}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": sys.maxsize,
        "wall_clock_breakdown": False,
    }


def init_deepspeed_distributed(backend: str) -> None:
    """Join the process group with ``backend`` (``auto``: nccl on CUDA, else gloo, where
    DeepSpeed's CPU accelerator would pick oneCCL).

    Without a launcher, RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT must be set (DeepSpeed
    otherwise looks for MPI); LOCAL_RANK defaults to RANK.
    """
    import deepspeed

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    deepspeed.init_distributed(dist_backend=backend)


def build_deepspeed_engine(model_fn: Callable[[], nn.Module], parallel: ParallelConfig | DeepSpeedLayout,
                           optim: AdamWSettings, *, micro_batch_size: int, grad_accum: int = 1,
                           precision: Precision = "fp32", cpu_adam: bool = True,
                           prefetch_numel: int = 0,
                           lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None) -> DeepSpeedEngine:
    """Build ``model_fn()`` under ``deepspeed.zero.Init`` and wrap it in a ZeRO-3 engine.

    ``model_fn`` is called twice: on the meta device (to size the settings; no random
    numbers are drawn) and under ``zero.Init`` (seed the default generator before calling
    this, identically on every rank). ``lr_scheduler`` builds the schedule from the optimizer
    DeepSpeed creates; the engine steps it at every optimizer step. Returns the engine:
    ``engine(x)``, ``engine.backward(loss)``, ``engine.step()``.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator at import
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    init_deepspeed_distributed(parallel.backend)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        sizes = parameter_sizes(model_fn())
    config = deepspeed_config(parallel, optim, micro_batch_size=micro_batch_size, grad_accum=grad_accum, sizes=sizes,
                              precision=precision, cpu_adam=cpu_adam, prefetch_numel=prefetch_numel)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = model_fn()
    set_z3_leaf_modules(model, [ScoreBankChunk, ValueBankChunk], raise_if_not_found=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config, lr_scheduler=lr_scheduler)
    return engine
