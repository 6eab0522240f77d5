"""Activation recomputation, applied from outside to a built model (``train.activation_checkpoint``).

Modes:

* ``none`` — every block keeps what autograd saves.
* ``block`` — each transformer block keeps only its input and runs its forward again in
  backward. Most memory saved; costs one more forward of every block, the bank kernels'
  per-pair projections included (for full Translution about 3 more of the 12 per-pair
  projection passes a step executes, so roughly a quarter more step time).
* ``selective`` — each block's feed-forward branch (its LayerNorm, both linears, GELU) is
  recomputed; the attention branch keeps its saved tensors. Why this and not the attention's
  dense probabilities: recomputing the ``B·h·N²`` probabilities means re-running the score and
  value kernels, the per-pair bank projections that dominate a Translution step, which is
  what ``block`` costs while saving less. The feed-forward is the opposite trade: it saves
  ``2·mlp + C`` values per token per block (the bulk of a block's non-quadratic activations)
  for ``2·C·mlp`` multiply-adds per token, small next to the kernels' ``N·C·C'`` per side.

Recomputation wraps a module's own ``forward`` in non-reentrant :func:`torch.utils.checkpoint`
and leaves the module tree and parameter names unchanged, so it composes with everything
that finds modules by type or state by name: head and displacement parallelism (their hooks
run again, collectives included, in the same order on every rank), FSDP2 (a unit's hooks
stay outside the checkpointed forward; inner units gather again for the recomputation) and
checkpoints. Apply it before FSDP2 wrapping; the model code knows nothing of it.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

from torch import nn
from torch.utils.checkpoint import checkpoint

from translution_dist.models.blocks import Block, FeedForward

ActivationCheckpoint = Literal["none", "block", "selective"]
MODES: tuple[str, ...] = get_args(ActivationCheckpoint)


def _recomputed_forward(module: nn.Module, *args, **kwargs):
    """``module``'s class ``forward`` under non-reentrant checkpointing (a partial over the module, so
    that ``copy.deepcopy`` of the model rebinds it to the copy)."""
    return checkpoint(type(module).forward, module, *args, use_reentrant=False, **kwargs)


def recomputed_module_types(mode: ActivationCheckpoint) -> tuple[type[nn.Module], ...]:
    """The module types whose forward ``mode`` recomputes in backward."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpoint must be one of {', '.join(MODES)}, got {mode!r}")
    return {"none": (), "block": (Block,), "selective": (FeedForward,)}[mode]


def apply_activation_checkpoint(model: nn.Module, mode: ActivationCheckpoint) -> nn.Module:
    """Make every module of ``recomputed_module_types(mode)`` under ``model`` recompute its forward
    in backward, in place; returns ``model``. Applying it twice is refused (it would nest)."""
    types = recomputed_module_types(mode)
    for module in model.modules():
        if isinstance(module, types):
            if "forward" in vars(module):
                raise ValueError(f"{type(module).__name__} already has its own forward (activation "
                                 "checkpointing applied twice?)")
            module.forward = functools.partial(_recomputed_forward, module)
    return model
