"""Displacement parallelism: every ``dispp`` rank holds some displacements of every bank.

Each bank chunk's rows are split contiguously over the ``dispp`` ranks (DTensor ``Shard(0)``;
with head parallelism ``[Shard(0), Shard(2)]`` on the ``(dispp, tp)`` mesh). Rows are stored
in ``layout.storage_order``, which interleaves heavy and light displacements so that
contiguous slices carry similar numbers of token pairs: exactly for causal windows, within
about 20% (dispp=2) to 50% (dispp=8) of the mean for image grids. :func:`displacement_balance`
reports it for any layout.

A rank *owns* the token pairs whose key-side displacement it holds; since the query, key and
value banks are all stored in key-side order, it holds every matrix its pairs need, and
since every allowed pair has exactly one displacement, the ranks' pairs partition all pairs.
Per layer:

* each chunk's ``rows`` is narrowed to the local rows, so its pair plan covers only owned
  pairs, and the rank computes those pairs' scores (zero elsewhere);
* the softmax over keys is completed across ranks (:class:`DisplacementSoftmax`, an online
  softmax: all-reduce MAX of row maxima, all-reduce SUM of exp-sums); each rank keeps the
  probabilities of its own pairs only. Scores every rank computes in full (α's dense
  ``⟨q1, k1⟩``, plain q/k sides) are thereby counted once: each rank uses them on its pairs;
* the partial outputs ``o_i = Σ_j a_ij·v_ij`` over owned pairs are summed over ranks before
  ``out_proj`` (all-reduce forward, identity backward);
* gradients flowing back to replicated tensors from owned pairs only are partial sums and are
  completed by one all-reduce where they enter a replicated computation: the bank inputs,
  the outputs of plain q/k/v projections (α's ``qkv_proj`` and a score side's low-rank
  projection without a bank);
* α's ``v_up`` reads the partial low-rank values: they are summed first, and its output is
  counted on the first ``dispp`` rank only (straight-through in backward), so that ``v_up``'s
  weight sees the whole input and every rank the whole gradient.

Other parameters (norms, MLP, projections) stay replicated over ``dispp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from parallelism.tensor_parallel import (
    complete_bank_input_grads,
    copy_output_hook,
    plain_low_rank_sides,
    reduce_input_hook,
)
from translution_dist.models.attention import (
    AlphaTranslutionAttention,
    RelativeAttentionBase,
    TranslutionAttention,
    bank_chunk_modules,
    chunk_bounds,
)
from translution_dist.ops import RelativeLayout


def local_rows(start: int, stop: int, dispp: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a bank chunk that ``rank`` holds: DTensor ``Shard(0)``'s split."""
    size, offset = Shard.local_shard_size_and_offset(stop - start, dispp, rank)
    return start + offset, start + offset + size


class _DistributedSoftmax(torch.autograd.Function):
    """Softmax over keys whose pairs are spread over a process group, each rank holding some.

    Forward returns the probabilities of this rank's ``allowed`` pairs (zero elsewhere).
    Backward needs ``Σ_j a_ij·dA_ij`` over all pairs: one all-reduce of a ``[B, h, N]`` tensor.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, allowed: Tensor, group: dist.ProcessGroup) -> Tensor:
        s = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~allowed, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(s - row_max)
        row_sum = exp.sum(dim=-1, keepdim=True)
        dist.all_reduce(row_sum, group=group)
        probs = exp / row_sum
        ctx.save_for_backward(probs)
        ctx.group = group
        return probs.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_probs: Tensor):
        (probs,) = ctx.saved_tensors
        grad_probs_dtype = grad_probs.dtype
        grad_probs = grad_probs.to(probs.dtype)
        weighted = (probs * grad_probs).sum(dim=-1, keepdim=True)
        dist.all_reduce(weighted, group=ctx.group)
        return (probs * (grad_probs - weighted)).to(grad_probs_dtype), None, None


class DisplacementSoftmax(nn.Module):
    """A layer's ``row_softmax`` under displacement parallelism (see :class:`_DistributedSoftmax`).

    Computed in float32 at least, returned in the scores' dtype like ``torch.softmax``. The
    pairs this rank owns are a buffer on the layer's device (``[T, T]``, a shorter causal
    sequence uses its corner), built once, so that no step copies a mask from the host.
    """

    def __init__(self, layout: RelativeLayout, owned_rows: Tensor, group: dist.ProcessGroup,
                 device: torch.device) -> None:
        super().__init__()
        self.layout = layout
        self.owned_rows = owned_rows
        self.group = group
        t = layout.max_tokens
        self.register_buffer("owned", torch.empty(t, t, dtype=torch.bool, device=device), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.owned.device.type != "meta":
            self.owned.copy_(self._owned_pairs())

    def _owned_pairs(self) -> Tensor:
        """``[T, T]`` bool: the allowed pairs whose key-side displacement this rank holds."""
        key_index, _ = self.layout.index_maps(self.layout.max_tokens)
        rows = self.layout.storage_row[key_index.clamp(min=0)]
        return self.owned_rows[rows] & (key_index >= 0)

    def owned_pairs(self, n: int) -> Tensor:
        return self.owned[:n, :n]

    def forward(self, scores: Tensor, mask: Tensor | None) -> Tensor:
        allowed = self.owned_pairs(scores.shape[-1])
        if mask is not None:
            allowed = allowed & mask
        return _DistributedSoftmax.apply(scores, allowed, self.group)


def _first_rank_only(mesh: DeviceMesh):
    """A forward hook that keeps a replicated output on the first rank of ``mesh`` only.

    The output then counts once in a later sum over ``mesh``; its gradient passes through
    unchanged on every rank (straight-through), so the weights that made it see the whole
    gradient everywhere.
    """
    first = mesh.get_local_rank() == 0
    return lambda module, args, output: output if first else output - output.detach()


def _shard_rows(chunk: nn.Module, mesh: DeviceMesh) -> None:
    """Keep this rank's rows of every bank of ``chunk`` (``Shard(0)`` on ``dispp``) and narrow ``rows``."""
    dispp = mesh["dispp"]
    start, stop = chunk.rows
    local_start, local_stop = local_rows(start, stop, dispp.size(), dispp.get_local_rank())
    for bank in chunk.children():
        weight = bank.weight
        if isinstance(weight, DTensor):  # head-parallel already: add the dispp dim in front
            target = mesh[("dispp", *weight.device_mesh.mesh_dim_names)]
            placements, full_rows = (Shard(0), *weight.placements), weight.to_local()
        else:
            target, placements, full_rows = dispp, (Shard(0),), weight
        local = full_rows.detach()[local_start - start:local_stop - start].clone()
        sharded = DTensor.from_local(local, target, placements, run_check=False,
                                     shape=weight.shape, stride=weight.stride())
        bank.weight = nn.Parameter(sharded, requires_grad=weight.requires_grad)
    chunk.rows = (local_start, local_stop)


def _owned_rows(layer: RelativeAttentionBase) -> Tensor:
    owned = torch.zeros(layer.layout.num_displacements, dtype=torch.bool)
    for chunk in bank_chunk_modules(layer):
        owned[chunk.rows[0]:chunk.rows[1]] = True
    return owned


def _local_device(layer: nn.Module) -> torch.device:
    """Where the layer's tensors live (``meta`` for a model not yet materialised)."""
    weight = next(layer.parameters())
    return (weight.to_local() if isinstance(weight, DTensor) else weight).device


def _parallelize_layer(layer: RelativeAttentionBase, mesh: DeviceMesh) -> None:
    dispp = mesh["dispp"]
    for chunk in bank_chunk_modules(layer):
        _shard_rows(chunk, mesh)
    layer.row_softmax = DisplacementSoftmax(layer.layout, _owned_rows(layer), dispp.get_group(),
                                            _local_device(layer))
    layer.out_proj.register_forward_pre_hook(reduce_input_hook(dispp), prepend=True)
    complete_bank_input_grads(layer, dispp)
    if isinstance(layer, AlphaTranslutionAttention):
        for name in ("qkv_proj", *(f"{side}_down" for side in plain_low_rank_sides(layer))):
            getattr(layer, name).register_forward_hook(copy_output_hook(dispp))
        if hasattr(layer, "v_up"):
            layer.v_up.register_forward_pre_hook(reduce_input_hook(dispp), prepend=True)
            layer.v_up.register_forward_hook(_first_rank_only(dispp))
    elif isinstance(layer, TranslutionAttention):
        for side in "qkv":
            if side not in layer.relative:
                getattr(layer, f"{side}_proj").register_forward_hook(copy_output_hook(dispp))


def apply_displacement_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split every bank's displacement rows over ``mesh["dispp"]``, in place (after tensor parallelism).

    ``mesh`` is the whole mesh (:func:`parallelism.mesh.build_mesh`): banks that are already
    head-parallel move to its ``(dispp, tp)`` dims. Works on a model on the meta device; a
    materialised model must be identical on every rank (each keeps its slice of its own copy).
    """
    for module in list(model.modules()):
        if isinstance(module, RelativeAttentionBase):
            _parallelize_layer(module, mesh)
    return model


@dataclass(frozen=True)
class DisplacementBalance:
    """Token pairs each ``dispp`` rank computes per layer, and the resulting imbalance."""

    pairs_per_rank: tuple[int, ...]

    @property
    def max_over_mean(self) -> float:
        """Step time is set by the busiest rank: 1.0 is perfect balance."""
        mean = sum(self.pairs_per_rank) / len(self.pairs_per_rank)
        return max(self.pairs_per_rank) / mean

    def __str__(self) -> str:
        return f"pairs per dispp rank {list(self.pairs_per_rank)}, max/mean {self.max_over_mean:.3f}"


def displacement_balance(layout: RelativeLayout, dispp: int, bank_chunks: int = 1,
                         num_tokens: int | None = None) -> DisplacementBalance:
    """The pairs each rank owns under :func:`apply_displacement_parallel` (no process group needed).

    ``num_tokens`` defaults to the layout's longest sequence.
    """
    counts = layout.pair_counts(num_tokens)[layout.storage_order]  # pairs per bank row
    pairs = []
    for rank in range(dispp):
        owned = 0
        for start, stop in chunk_bounds(layout.num_displacements, bank_chunks):
            a, b = local_rows(start, stop, dispp, rank)
            owned += int(counts[a:b].sum())
        pairs.append(owned)
    return DisplacementBalance(tuple(pairs))
