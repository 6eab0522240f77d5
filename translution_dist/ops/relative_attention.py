"""Exact, memory-bounded Translution attention kernels.

Translution gives every (query, key) pair its own projections: ``q_ij = x_i·Wq[d(i,j)]``,
``k_ij = x_j·Wk[d(i,j)]`` and ``v_ij = x_j·Wv[d(i,j)]``, with ``d`` the key-side displacement
(banks in key-side order, see :mod:`translution_dist.ops.layouts`). Materializing those per pair costs
``O(N²·C')`` activations (and the official code even gathers an ``[N, N, C, C']`` weight
tensor). The two kernels here walk the displacement axis chunk by chunk instead
(:mod:`translution_dist.ops.pair_plan`), keep only dense ``[B, h, N, N]`` scores and
``[B, N, C']`` outputs, and recompute the per-pair projections in backward:

* :func:`pair_scores`  — ``s_ij = scale·⟨q_ij, k_ij⟩`` for the planned pairs, dense;
* :func:`pair_values`  — ``o_i = Σ_j a_ij·v_ij`` for the planned pairs.

The softmax between them is ordinary (or distributed, for displacement parallelism), so a
bank split into chunks or shards is simply several plans whose results are summed.

A side that is not relative passes ``weight=None`` and an already projected ``[B, N, C']``
tensor, which the kernels gather per pair. Heads are counted from the width in hand
(``C'_local / dim_head``), so a head-sharded bank works unchanged; a DTensor bank is used
through its local shard.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch.distributed.tensor import DTensor

from translution_dist.ops.pair_plan import PairChunk, PairPlan


def _token_major(x: Tensor) -> Tensor:
    """``[B, N, C] -> [N + 1, B, C]`` with a zero row at ``N`` for padding slots."""
    b, _, c = x.shape
    return torch.cat([x.transpose(0, 1), x.new_zeros(1, b, c)], dim=0)


def _batch_major(x_t: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_token_major` for gradients: drop the padding row."""
    return x_t[:n].transpose(0, 1)


class _Projection:
    """One chunk's per-pair projection ``x_t[tokens] @ weight[rows]`` (or a plain gather)."""

    def __init__(self, x_t: Tensor, weight: Tensor | None, tokens: Tensor, rows: Tensor) -> None:
        d, p = tokens.shape
        self.tokens, self.rows = tokens, rows
        self.inputs = x_t[tokens].reshape(d, p * x_t.shape[1], x_t.shape[2])
        self.matrices = None if weight is None else weight[rows].to(x_t.dtype)
        self.outputs = self.inputs if self.matrices is None else torch.bmm(self.inputs, self.matrices)

    def backward(self, grad_outputs: Tensor, grad_t: Tensor, weight_grad: Tensor | None) -> None:
        """Scatter the gradient of :attr:`outputs` into the input (and the bank rows)."""
        if self.matrices is None:
            grad_inputs = grad_outputs
        else:
            grad_inputs = torch.bmm(grad_outputs, self.matrices.transpose(1, 2))
            if weight_grad is not None:
                rows_grad = torch.bmm(self.inputs.transpose(1, 2), grad_outputs)
                weight_grad.index_add_(0, self.rows, rows_grad.to(weight_grad.dtype))
        d, p = self.tokens.shape
        grad_t.index_add_(0, self.tokens.flatten(), grad_inputs.reshape(d * p, *grad_t.shape[1:]))


def _pairs_of(dense: Tensor, chunk: PairChunk) -> Tensor:
    """Gather ``[B, h, N·N + 1]`` dense values of a chunk's pairs as ``[D, P, B, h, 1]``."""
    d, p = chunk.shape
    b, h, _ = dense.shape
    return dense[:, :, chunk.flat_pairs].reshape(b, h, d, p).permute(2, 3, 0, 1).unsqueeze(-1)


def _scatter_pairs(dense: Tensor, chunk: PairChunk, values: Tensor) -> None:
    """Write ``[D, P, B, h]`` pair values into ``[B, h, N·N + 1]``."""
    d, p, b, h = values.shape
    dense[:, :, chunk.flat_pairs] = values.permute(2, 3, 0, 1).reshape(b, h, d * p)


def _padded_dense(x: Tensor) -> Tensor:
    """``[B, h, N, N] -> [B, h, N·N + 1]`` with a scratch slot for padding pairs."""
    b, h, n, _ = x.shape
    return torch.cat([x.reshape(b, h, n * n), x.new_zeros(b, h, 1)], dim=2)


class _PairScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xq, xk, wq, wk, plan: PairPlan, dim_head: int, scale: float):
        b, n, _ = xq.shape
        heads = (xq.shape[-1] if wq is None else wq.shape[-1]) // dim_head
        xq_t, xk_t = _token_major(xq), _token_major(xk)
        dense = xq.new_zeros(b, heads, n * n + 1)
        for chunk in plan.chunks:
            d, p = chunk.shape
            q = _Projection(xq_t, wq, chunk.query_tokens, chunk.rows).outputs
            k = _Projection(xk_t, wk, chunk.key_tokens, chunk.rows).outputs
            s = (q.view(d, p, b, heads, -1) * k.view(d, p, b, heads, -1)).sum(-1)
            _scatter_pairs(dense, chunk, s * scale)
        ctx.save_for_backward(xq, xk, wq, wk)
        ctx.plan, ctx.heads, ctx.scale = plan, heads, scale
        return dense[:, :, : n * n].view(b, heads, n, n)

    @staticmethod
    def backward(ctx, grad_scores):
        xq, xk, wq, wk = ctx.saved_tensors
        plan, heads, scale = ctx.plan, ctx.heads, ctx.scale
        b, n, _ = xq.shape
        xq_t, xk_t = _token_major(xq), _token_major(xk)
        grad_dense = _padded_dense(grad_scores.contiguous())
        gxq_t, gxk_t = torch.zeros_like(xq_t), torch.zeros_like(xk_t)
        gwq = torch.zeros_like(wq) if wq is not None and ctx.needs_input_grad[2] else None
        gwk = torch.zeros_like(wk) if wk is not None and ctx.needs_input_grad[3] else None
        for chunk in plan.chunks:
            d, p = chunk.shape
            q = _Projection(xq_t, wq, chunk.query_tokens, chunk.rows)
            k = _Projection(xk_t, wk, chunk.key_tokens, chunk.rows)
            g = _pairs_of(grad_dense, chunk) * scale  # [D, P, B, h, 1]
            q.backward((g * k.outputs.view(d, p, b, heads, -1)).reshape(q.outputs.shape), gxq_t, gwq)
            k.backward((g * q.outputs.view(d, p, b, heads, -1)).reshape(k.outputs.shape), gxk_t, gwk)
        return _batch_major(gxq_t, n), _batch_major(gxk_t, n), gwq, gwk, None, None, None


class _PairValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, xv, wv, plan: PairPlan):
        b, heads, n, _ = attn.shape
        xv_t = _token_major(xv)
        attn_dense = _padded_dense(attn)
        out_t = None
        for chunk in plan.chunks:
            d, p = chunk.shape
            v = _Projection(xv_t, wv, chunk.key_tokens, chunk.rows).outputs
            if out_t is None:
                out_t = xv.new_zeros(n + 1, b, v.shape[-1])
            weighted = _pairs_of(attn_dense, chunk) * v.view(d, p, b, heads, -1)
            out_t.index_add_(0, chunk.query_tokens.flatten(), weighted.reshape(d * p, b, -1))
        if out_t is None:  # an empty plan (a shard that owns no pair of this sequence)
            out_features = xv.shape[-1] if wv is None else wv.shape[-1]
            out_t = xv.new_zeros(n + 1, b, out_features)
        ctx.save_for_backward(attn, xv, wv)
        ctx.plan = plan
        return _batch_major(out_t, n)

    @staticmethod
    def backward(ctx, grad_out):
        attn, xv, wv = ctx.saved_tensors
        plan = ctx.plan
        b, heads, n, _ = attn.shape
        xv_t = _token_major(xv)
        grad_out_t = _token_major(grad_out.contiguous())
        attn_dense = _padded_dense(attn)
        grad_attn = attn.new_zeros(b, heads, n * n + 1)
        gxv_t = torch.zeros_like(xv_t)
        gwv = torch.zeros_like(wv) if wv is not None and ctx.needs_input_grad[2] else None
        for chunk in plan.chunks:
            d, p = chunk.shape
            v = _Projection(xv_t, wv, chunk.key_tokens, chunk.rows)
            go = grad_out_t[chunk.query_tokens].view(d, p, b, heads, -1)
            _scatter_pairs(grad_attn, chunk, (go * v.outputs.view(d, p, b, heads, -1)).sum(-1))
            v.backward((_pairs_of(attn_dense, chunk) * go).reshape(v.outputs.shape), gxv_t, gwv)
        grad_attn = grad_attn[:, :, : n * n].view(b, heads, n, n)
        return grad_attn, _batch_major(gxv_t, n), gwv, None


def _local(weight: Tensor | None) -> Tensor | None:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def pair_scores(
    xq: Tensor, xk: Tensor, wq: Tensor | None, wk: Tensor | None, plan: PairPlan, dim_head: int, scale: float,
) -> Tensor:
    """Dense ``[B, h, N, N]`` scores ``scale·⟨q_ij, k_ij⟩`` of the planned pairs, zero elsewhere.

    ``xq``/``xk`` are ``[B, N, C_in]`` inputs of relative sides (with ``[D, C_in, C']``
    banks ``wq``/``wk`` whose rows the plan names) or ``[B, N, C']`` projections of plain
    sides (weight ``None``).
    """
    return _PairScores.apply(xq, xk, _local(wq), _local(wk), plan.to(xq.device), dim_head, scale)


def pair_values(attn: Tensor, xv: Tensor, wv: Tensor | None, plan: PairPlan) -> Tensor:
    """``[B, N, C']`` outputs ``o_i = Σ_j a_ij·v_ij`` over the planned pairs, heads concatenated."""
    return _PairValues.apply(attn, xv, _local(wv), plan.to(xv.device))
