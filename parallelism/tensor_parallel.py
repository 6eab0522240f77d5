"""Head-parallel tensor parallelism (Megatron-style), applied from outside the model.

Every ``tp`` rank holds ``heads/tp`` whole heads of every attention layer and ``1/tp`` of every
feed-forward; a block's input and output are replicated over the ``tp`` group.

* Displacement banks ``[rows, C_in, heads·d]`` are DTensors ``Shard(2)``: whole heads of the
  output axis. The kernels count heads from the local width (``dim_head`` fixed), so a rank
  computes its heads' scores and values for every pair with no communication.
* Plain linear maps use ``parallelize_module``: q/k/v projections and the MLP's first layer
  column-wise, ``out_proj`` and the MLP's second layer row-wise (their partial outputs are
  all-reduced). A fused ``qkv_proj`` is sharded column-wise as stored (``Shard(0)``, so DCP
  reshards it like any other weight) and its output regrouped into this rank's heads of q, k
  and v (an all-gather forward, a reduce-scatter backward).
* α-Translution: its banks ``[K, h·r, h·r]`` map all heads' rank-r inputs to all heads'
  outputs. They are split by heads on the output axis only: the down projections that feed
  banks stay replicated (``C·h·r``, small), every rank feeds the whole ``h·r`` input to its
  output columns, and ``v_up`` (which mixes the heads' low-rank values) is column-parallel
  over the gathered ``h·r`` input (``ColwiseParallel(input_layouts=Shard(-1))``). A score
  side that is not relative (``k_down`` of LoR_Q, ``q_down`` of LoR_K, …) is used per head
  as it is: column-parallel like a plain q/k projection.
* The gradient that a rank's heads return to a replicated input is partial; each consumer
  that computes only some heads completes it with :func:`copy_to_region` (identity forward,
  all-reduce backward): ``ColwiseParallel`` does so for its input, and the bank inputs get one
  per producer (see :func:`complete_bank_input_grads`).
* ``vocab_parallel`` (GPT): the token embedding row-wise and the head column-wise over the
  vocabulary, logits all-gathered (the loss code is unchanged).

Replicated parameters (norms, embeddings of the ViT, down projections) stay plain tensors:
every rank computes the same gradient for them.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from translution_dist.models.attention import (
    AlphaTranslutionAttention,
    RelativeAttentionBase,
    SelfAttention,
    TranslutionAttention,
    ValueBankChunk,
    bank_chunk_modules,
)
from translution_dist.models.blocks import FeedForward


def copy_to_region(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """Identity forward; backward sums the gradient over ``mesh`` (Megatron's ``f``)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def reduce_from_region(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """All-reduce (sum) forward; identity backward (Megatron's ``g``)."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def copy_output_hook(mesh: DeviceMesh):
    """A forward hook that passes a module's output through :func:`copy_to_region`."""
    return lambda module, args, output: copy_to_region(output, mesh)


def reduce_input_hook(mesh: DeviceMesh):
    """A forward pre-hook that passes a module's first input through :func:`reduce_from_region`."""
    return lambda module, args: (reduce_from_region(args[0], mesh), *args[1:])


def complete_bank_input_grads(layer: RelativeAttentionBase, mesh: DeviceMesh) -> None:
    """Make the gradient the bank paths return to their replicated inputs complete over ``mesh``.

    A rank's banks hold some heads (``tp``) or some displacements (``dispp``), so the gradient
    they give their input is a partial sum. It is completed once per distinct input, at the
    module producing it: α's down projections; Translution's norm when only banks read it.
    When plain projections read the norm too (they complete their own input gradient), each
    chunk completes its relative inputs instead.
    """
    hook = copy_output_hook(mesh)
    if isinstance(layer, AlphaTranslutionAttention):
        for side in layer.relative:
            getattr(layer, f"{side}_down").register_forward_hook(hook)
    elif isinstance(layer, TranslutionAttention) and layer.relative == "qkv":
        layer.norm.register_forward_hook(hook)
    else:
        for chunk in bank_chunk_modules(layer):
            chunk.register_forward_pre_hook(partial(_copy_relative_inputs, mesh=mesh))


def _copy_relative_inputs(chunk: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
    """Pre-hook of a bank chunk: complete the gradients of the inputs its banks project."""
    if isinstance(chunk, ValueBankChunk):
        attn, xv = args
        return attn, copy_to_region(xv, mesh)
    xq, xk, scale = args
    shared = xk is xq  # both sides project the same input: complete its gradient once
    if hasattr(chunk, "q"):
        xq = copy_to_region(xq, mesh)
    if hasattr(chunk, "k"):
        xk = xq if shared and hasattr(chunk, "q") else copy_to_region(xk, mesh)
    return xq, xk, scale


def _local_heads_of_fused_qkv(module: nn.Module, args: tuple, output: DTensor) -> Tensor:
    """Forward hook of a column-parallel fused ``qkv_proj``: this rank's heads of q, k and v.

    The rank's columns of ``[q | k | v]`` are a contiguous block that mixes the three; gather
    them all and keep this rank's slice of each (its gradient goes back as a reduce-scatter).
    """
    mesh = output.device_mesh
    full = output.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    rank, size = mesh.get_local_rank(), mesh.size()
    return torch.cat([part.chunk(size, dim=-1)[rank] for part in full.chunk(3, dim=-1)], dim=-1)


def _shard_banks_by_heads(layer: RelativeAttentionBase, mesh: DeviceMesh) -> None:
    for chunk in bank_chunk_modules(layer):
        for bank in chunk.children():
            bank.weight = nn.Parameter(distribute_tensor(bank.weight, mesh, [Shard(2)]),
                                       requires_grad=bank.weight.requires_grad)


def _fused_qkv(layer: nn.Module, mesh: DeviceMesh) -> None:
    parallelize_module(layer.qkv_proj, mesh, ColwiseParallel(use_local_output=False))
    layer.qkv_proj.register_forward_hook(_local_heads_of_fused_qkv)


def _parallelize_translution(layer: TranslutionAttention, mesh: DeviceMesh) -> None:
    plan = {f"{side}_proj": ColwiseParallel() for side in "qkv" if side not in layer.relative}
    parallelize_module(layer, mesh, {**plan, "out_proj": RowwiseParallel()})
    _shard_banks_by_heads(layer, mesh)
    complete_bank_input_grads(layer, mesh)


def plain_low_rank_sides(layer: AlphaTranslutionAttention) -> list[str]:
    """Score sides of α's Translution term that are a low-rank projection without a bank."""
    return [side for side in "qk" if side not in layer.relative and hasattr(layer, f"{side}_down")]


def _parallelize_alpha(layer: AlphaTranslutionAttention, mesh: DeviceMesh) -> None:
    _fused_qkv(layer, mesh)
    plan = {f"{side}_down": ColwiseParallel() for side in plain_low_rank_sides(layer)}
    if hasattr(layer, "v_up"):
        plan["v_up"] = ColwiseParallel(input_layouts=Shard(-1))
    parallelize_module(layer, mesh, {**plan, "out_proj": RowwiseParallel()})
    _shard_banks_by_heads(layer, mesh)
    complete_bank_input_grads(layer, mesh)


def _parallelize_self_attention(layer: SelfAttention, mesh: DeviceMesh) -> None:
    _fused_qkv(layer, mesh)
    parallelize_module(layer, mesh, {"out_proj": RowwiseParallel()})


def _parallelize_vocabulary(model: nn.Module, mesh: DeviceMesh) -> None:
    parallelize_module(model, mesh, {
        "token_embedding": RowwiseParallel(input_layouts=Replicate()),
        "head": ColwiseParallel(output_layouts=Replicate()),
    })


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, vocab_parallel: bool = False) -> nn.Module:
    """Shard ``model``'s attention layers by heads and its feed-forwards by columns, in place.

    ``mesh`` is the 1-D ``tp`` mesh. Works on a model on the meta device; a materialised model
    must be identical on every rank (the shards are scattered from the group's first rank).
    Modules it does not know stay replicated, which is correct, only not sharded. Whether the
    model suits ``tp`` is checked before, by :meth:`parallelism.config.ParallelConfig.check_model`.
    """
    for module in list(model.modules()):
        if isinstance(module, TranslutionAttention):
            _parallelize_translution(module, mesh)
        elif isinstance(module, AlphaTranslutionAttention):
            _parallelize_alpha(module, mesh)
        elif isinstance(module, SelfAttention):
            _parallelize_self_attention(module, mesh)
        elif isinstance(module, FeedForward):
            parallelize_module(module, mesh, {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})
    if vocab_parallel:
        _parallelize_vocabulary(model, mesh)
    return model
