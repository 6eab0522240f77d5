"""The ``dcp/`` part of a checkpoint for the torch backends (one process, FSDP2, tp, dispp).

Model and optimizer state are saved as DCP state dicts with global shapes
(``get_state_dict``), so a checkpoint written under one layout and world size loads under any
other, DeepSpeed's included (:mod:`training.checkpoint.deepspeed_state` writes the same keys).
The atomic protocol around it is :mod:`training.checkpoint.store`.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _whole_model_param_groups(optim_state: dict[str, Any], pipeline_group: dist.ProcessGroup) -> None:
    """List every stage's FQNs in each param group, as one process would (pipeline stages list only their own).

    Every rank then writes the same ``optim.param_groups``, and the checkpoint is the one an
    unsplit model writes: it resumes at any ``pp`` and split.
    """
    for group in optim_state["param_groups"]:
        stages: list[list[str]] = [[] for _ in range(dist.get_world_size(pipeline_group))]
        dist.all_gather_object(stages, list(group["params"]), group=pipeline_group)
        group["params"] = [name for stage in stages for name in stage]


def save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path,
         async_group: dist.ProcessGroup | None = None,
         pipeline_group: dist.ProcessGroup | None = None) -> Future | None:
    """Write ``path/dcp``; with ``async_group`` in the background (the future completes it).

    ``pipeline_group``: the ``pp`` ranks, when ``model`` is one pipeline stage.
    """
    state = _state(model, optimizer)
    if pipeline_group is not None:
        _whole_model_param_groups(state["optim"], pipeline_group)
    if async_group is not None:
        return dcp.async_save(state, checkpoint_id=str(path / "dcp"), process_group=async_group)
    dcp.save(state, checkpoint_id=str(path / "dcp"))
    return None


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Read ``path/dcp`` into ``model`` and ``optimizer``, resharded to their layout."""
    state = _state(model, optimizer)
    own = [list(group["params"]) for group in state["optim"]["param_groups"]]
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    for group, params in zip(state["optim"]["param_groups"], own):  # the whole model's FQNs may have been saved
        group["params"] = params
    foreach = [group["foreach"] for group in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for group, value in zip(optimizer.param_groups, foreach):  # how to step is this layout's choice
        group["foreach"] = value
