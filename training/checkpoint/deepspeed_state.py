"""DeepSpeed ZeRO-3 state as the DCP checkpoint every engine writes.

The layout is the one ``torch.distributed.checkpoint.state_dict.get_state_dict`` gives the torch
engines (``TorchBackend.save_state``), global shapes throughout:

* ``model.<fqn>``: the fp32 parameter (DeepSpeed's fp32 master, also in bf16/fp16 mode);
* ``optim.state.<fqn>.step|exp_avg|exp_avg_sq``: AdamW's state, the step a float32 scalar;
* ``optim.param_groups.0.*``: the param group the torch engines' AdamW holds, with this
  run's learning rate and hyperparameters, ``params`` listing every FQN.

So a checkpoint written by DeepSpeed at any world size resumes under DeepSpeed at another,
under FSDP2 or in one process, and the reverse; ``translution ckpt`` reads it.

**Save.** Parameter by parameter, in one order on every rank, DeepSpeed's
``safe_get_full_fp32_param``/``safe_get_full_optimizer_state`` all-gather the full fp32 value
and moments; one owner rank (round robin) keeps them in host memory and the others drop
them. ``dcp.save`` then writes each rank's own entries (disjoint keys: DCP's global plan
merges them into one checkpoint). A rank holds its ~1/world share of the model's 12 bytes per
parameter, plus the one parameter being gathered: at most one bank chunk side or one plain
layer, since the bank-chunk modules keep parameters bounded.

**Load.** Full-size targets are built for a batch of parameters at a time (weights and
moments at most ``LOAD_BATCH_BYTES``, or one parameter), read with ``dcp.load`` (which
assembles them from whatever sharding wrote them), and every rank hands DeepSpeed its own
partition (``safe_set_local_*``). Those helpers write only the fp32 master, so the partitions
forward uses are then refreshed from it and the persistent (small, unpartitioned) parameters
re-gathered.

The optimizer step count, the moments of a never-stepped optimizer and the refresh reach
into DeepSpeed 0.19's ZeRO-3 optimizer (``fp32_partitioned_groups_flat``, its base
optimizer's ``state``, and its NVMe swapping), as DeepSpeed's own checkpoint loaders do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
MOMENTS = ("exp_avg", "exp_avg_sq")
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay")
"""The param-group entries DeepSpeed's optimizer shares with torch's AdamW; a resume restores them, as torch's does."""
LOAD_BATCH_BYTES = 1 << 30
"""Full-size fp32 tensors (weights and both moments) a rank reads at once while loading."""

Named = list[tuple[str, nn.Parameter]]


def trainable(engine: DeepSpeedEngine) -> Named:
    """``(fqn, parameter)`` in module order; the FQNs are the model's own (no ``module.`` prefix of the engine)."""
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


# -- DeepSpeed's AdamW state --------------------------------------------------------------------

def _fresh_step(base: torch.optim.Optimizer) -> torch.Tensor | int:
    """Step 0 in the optimizer's own type: torch's Adam/AdamW count in a tensor, DeepSpeed's kernels in an int."""
    return torch.tensor(0.0) if isinstance(base, torch.optim.Adam) else 0


@contextmanager
def _in_memory(engine: DeepSpeedEngine, sub_group: int) -> Iterator[None]:
    """Hold a sub-group's fp32 partition and optimizer state in memory: with NVMe optimizer
    offload they are swapped in and out, as around DeepSpeed's own optimizer step."""
    zero = engine.optimizer
    swapped = zero._swappable_optimizer_subgroup(sub_group)
    if swapped:
        zero._optimizer_states_and_gradient_swap_in(sub_group)
    yield
    if swapped:
        zero._optimizer_states_and_gradient_swap_out(sub_group)


def _ensure_adam_state(engine: DeepSpeedEngine) -> None:
    """Give every fp32 partition the zero moments and step 0 its first optimizer step would create.

    AdamW creates its state lazily, so a freshly built engine has none to be loaded into (or
    saved from: the torch engines save a never-stepped optimizer the same way).
    """
    zero = engine.optimizer
    base = zero.optimizer
    for sub_group, flat in enumerate(zero.fp32_partitioned_groups_flat):
        if base.state[flat]:
            continue
        with _in_memory(engine, sub_group):
            base.state[flat].update(step=_fresh_step(base), exp_avg=torch.zeros_like(flat),
                                    exp_avg_sq=torch.zeros_like(flat))


def adam_step(engine: DeepSpeedEngine) -> float:
    """The optimizer steps taken; every fp32 partition steps together, so the first one's count is all's."""
    zero = engine.optimizer
    return float(zero.optimizer.state[zero.fp32_partitioned_groups_flat[0]]["step"])


def _set_adam_step(engine: DeepSpeedEngine, step: float) -> None:
    """Set every fp32 partition's step count, in the type its optimizer keeps it."""
    zero = engine.optimizer
    for flat in zero.fp32_partitioned_groups_flat:
        state = zero.optimizer.state[flat]
        if isinstance(state["step"], torch.Tensor):
            state["step"].fill_(step)
        else:
            state["step"] = int(step)


def _refresh_working_partitions(engine: DeepSpeedEngine) -> None:
    """Copy the fp32 master into the partitions forward gathers, then re-gather the persistent parameters.

    ``safe_set_local_fp32_param`` writes only the master (a separate copy with an offloaded
    optimizer or in bf16/fp16); this is the copy DeepSpeed makes after every optimizer step.
    """
    zero = engine.optimizer
    for sub_group in range(len(zero.fp16_groups)):
        with _in_memory(engine, sub_group):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
    zero.checkpoint_event_epilogue()


# -- the param group ---------------------------------------------------------------------------

def _param_group(engine: DeepSpeedEngine, torch_defaults: dict[str, Any], fqns: list[str]) -> dict[str, Any]:
    """The param group a torch engine would save: its AdamW's defaults, this run's hyperparameters, every FQN."""
    live = engine.optimizer.param_groups[0]
    return {**torch_defaults, **{key: live[key] for key in HYPERPARAMETERS if key in live}, "params": fqns}


def _load_hyperparameters(engine: DeepSpeedEngine, checkpoint: str) -> None:
    """Group 0's hyperparameters onto every DeepSpeed group (a torch engine's groups all hold the same)."""
    request = {"optim": {"param_groups": [dict.fromkeys(HYPERPARAMETERS)]}}
    dcp.load(request, checkpoint_id=checkpoint)
    for group in engine.optimizer.param_groups:
        group.update(request["optim"]["param_groups"][0])


# -- save --------------------------------------------------------------------------------------

def _gather(p: nn.Parameter) -> dict[str, torch.Tensor]:
    """The full fp32 value and moments of ``p`` (collectives: every rank calls this for every parameter)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {"param": safe_get_full_fp32_param(p), **{key: safe_get_full_optimizer_state(p, key) for key in MOMENTS}}


def _owned_state(engine: DeepSpeedEngine, group: dict[str, Any]) -> dict[str, Any]:
    """This rank's share of the checkpoint: the parameters ``index % world == rank``, in the DCP layout."""
    rank, world = dist.get_rank(), dist.get_world_size()
    step = torch.tensor(adam_step(engine))
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    for index, (name, p) in enumerate(trainable(engine)):
        full = _gather(p)
        if index % world == rank:
            model[name] = full["param"].cpu()
            optim[name] = {"step": step.clone(), **{key: full[key].cpu() for key in MOMENTS}}
    return {"model": model, "optim": {"state": optim, "param_groups": [group]}}


def save(engine: DeepSpeedEngine, directory: Path, torch_defaults: dict[str, Any]) -> None:
    """Write ``directory/dcp`` (collective). ``torch_defaults``: the torch engines' AdamW defaults."""
    _ensure_adam_state(engine)
    group = _param_group(engine, torch_defaults, [name for name, _ in trainable(engine)])
    dcp.save(_owned_state(engine, group), checkpoint_id=str(directory / DCP_DIR))


# -- load --------------------------------------------------------------------------------------

def _batches(named: Named, budget: int) -> Iterator[Named]:
    """Consecutive parameters whose full fp32 weights and moments fit ``budget`` bytes (one at least)."""
    batch: Named = []
    size = 0
    for name, p in named:
        cost = (1 + len(MOMENTS)) * p.ds_numel * 4
        if batch and size + cost > budget:
            yield batch
            batch, size = [], 0
        batch.append((name, p))
        size += cost
    if batch:
        yield batch


def _targets(batch: Named) -> dict[str, Any]:
    """Full-size fp32 tensors for ``batch``'s entries, for ``dcp.load`` to fill."""
    def full(p: nn.Parameter) -> torch.Tensor:
        return torch.empty(p.ds_shape, dtype=torch.float32)

    return {"model": {name: full(p) for name, p in batch},
            "optim": {"state": {name: {"step": torch.zeros(()), **{key: full(p) for key in MOMENTS}}
                                for name, p in batch}}}


def _partition(p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``full``: ceil(numel / world) elements, the last rank's zero-padded.

    DeepSpeed 0.19's ``safe_set_full_*`` cannot fill a padded partition (it slices past the
    end), so the partition is cut here and set with ``safe_set_local_*``.
    """
    size = p.partition_numel()
    start = size * dist.get_rank(group=getattr(p, "ds_process_group", None))
    local = full.flatten()[start:start + size]
    return torch.nn.functional.pad(local, (0, size - local.numel()))


def _keep_partitions(batch: Named, loaded: dict[str, Any]) -> list[float]:
    """Give DeepSpeed this rank's partition of each parameter's weights and moments; returns their steps."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    steps = []
    for name, p in batch:
        state = loaded["optim"]["state"][name]
        safe_set_local_fp32_param(p, _partition(p, loaded["model"][name]))
        for key in MOMENTS:
            safe_set_local_optimizer_state(p, _partition(p, state[key]), key)
        steps.append(state["step"].item())
    return steps


def load(engine: DeepSpeedEngine, directory: Path) -> None:
    """Read ``directory/dcp``, written by any engine at any world size (collective)."""
    checkpoint = str(directory / DCP_DIR)
    _ensure_adam_state(engine)
    engine.optimizer.checkpoint_event_prologue()  # release every gathered parameter before its partition changes
    steps: list[float] = []
    for batch in _batches(trainable(engine), LOAD_BATCH_BYTES):
        loaded = _targets(batch)
        dcp.load(loaded, checkpoint_id=checkpoint)
        steps += _keep_partitions(batch, loaded)
    if len(set(steps)) > 1:
        log.warning("the checkpoint's parameters took %g to %g optimizer steps; DeepSpeed counts one for all: %g",
                    min(steps), max(steps), max(steps))
    _set_adam_step(engine, max(steps))
    _load_hyperparameters(engine, checkpoint)
    _refresh_working_partitions(engine)
