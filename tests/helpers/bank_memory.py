"""How much bank a rank holds gathered at once under ZeRO-3 (FSDP2 or DeepSpeed).

The measure: the number of bank elements (parameters of bank chunk modules) whose
*unsharded* storage exists on this rank, counted in the rank's unsharded size (the full
tensor, or its tensor-/displacement-parallel shard when those shard it). Non-bank
parameters are not counted. The sharded copies every rank keeps permanently are not
counted either.

Gathering and freeing happen only in the engines' module hooks, and a chunk is gathered at
least from its pre-forward (pre-backward) hook to its post-forward (post-backward) hook, so
the probe samples exactly inside those windows: in a forward pre-hook that runs after the
engine's, and in backward after the chunk's gradients are computed but before the engine
releases it. A prefetched chunk stays gathered until its own use, so it is seen as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from translution_dist.models.attention import bank_chunk_modules

ZeroEngine = Literal["fsdp", "deepspeed"]


def _fsdp_numel(chunk: nn.Module) -> int:
    """Unsharded elements of an FSDP2 chunk unit (its local tp/dispp share where sharded so)."""
    return sum(fsdp_param._orig_size.numel() for fsdp_param in chunk._get_fsdp_state()._fsdp_param_group.fsdp_params)


def _fsdp_gathered(chunk: nn.Module) -> int:
    """All of an FSDP2 chunk unit while its all-gather is pending or done, none once
    resharded (reads FSDP2's private parameter-group state)."""
    group = chunk._get_fsdp_state()._fsdp_param_group
    return _fsdp_numel(chunk) if group.is_unsharded or group._all_gather_result is not None else 0


def _deepspeed_gathered(chunk: nn.Module) -> int:
    """Bank elements of a DeepSpeed chunk whose parameters are available or in flight."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in chunk.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)


def _deepspeed_numel(chunk: nn.Module) -> int:
    return sum(p.ds_numel for p in chunk.parameters())


class _SampleInBackward(torch.autograd.Function):
    """Identity on a chunk's inputs whose backward samples the probe (after the chunk's own
    backward, before the engine's post-backward hook releases the chunk)."""

    @staticmethod
    def forward(ctx, probe: BankGatherProbe, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.probe = probe
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[None | Tensor, ...]:
        ctx.probe.sample()
        return (None, *grads)


class BankGatherProbe:
    """Records the peak of gathered bank elements on this rank while it is installed.

    Install it after the engine (``apply_fsdp`` or ``deepspeed.initialize``) so that its
    hooks run after the engine's. ``chunk_numel`` is the largest single chunk (all its
    sides), the bound that one-chunk-at-a-time gathering must respect.
    """

    def __init__(self, model: nn.Module, engine: ZeroEngine) -> None:
        self.chunks = bank_chunk_modules(model)
        if not self.chunks:
            raise ValueError("model has no bank chunks to probe")
        deepspeed = engine == "deepspeed"
        self._gathered: Callable[[nn.Module], int] = _deepspeed_gathered if deepspeed else _fsdp_gathered
        self.chunk_numel = max((_deepspeed_numel if deepspeed else _fsdp_numel)(chunk) for chunk in self.chunks)
        self.peak = 0
        self.samples = 0
        self._handles: list[RemovableHandle] = [
            chunk.register_forward_pre_hook(self._pre_forward) for chunk in self.chunks]

    def sample(self) -> None:
        """Count the gathered bank elements now and keep the maximum."""
        self.samples += 1
        self.peak = max(self.peak, sum(self._gathered(chunk) for chunk in self.chunks))

    def _pre_forward(self, module: nn.Module, args: tuple) -> tuple:
        self.sample()
        grads = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
        if not grads or not torch.is_grad_enabled():
            return args
        wrapped = _SampleInBackward.apply(self, *(args[i] for i in grads))
        args = list(args)
        for i, tensor in zip(grads, wrapped):
            args[i] = tensor
        return tuple(args)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> BankGatherProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
