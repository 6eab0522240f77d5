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

Performance notes (CPU and GPU alike): everything per pair lives in token-major or
pair-major layouts (``[N + 1, B, C]``, ``[N·N + 1, B, h]``) so that gathers and scatters move
whole ``B·C`` rows; per-chunk tensors are written into scratch buffers reused across the
chunks of a pass (fresh chunk-sized allocations cost page faults on every chunk); bank rows
are strided views where the plan allows, and bank gradients are written, not accumulated.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import register_flop_formula

from translution_dist.ops.pair_plan import PairChunk, PairPlan, PlanSpec, chunk_segments


def _token_major(x: Tensor) -> Tensor:
    """``[B, N, C] -> [N + 1, B, C]`` with a zero row at ``N`` for padding slots."""
    b, _, c = x.shape
    return torch.cat([x.transpose(0, 1), x.new_zeros(1, b, c)], dim=0)


def _batch_major(x_t: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_token_major` for gradients: drop the padding row."""
    return x_t[:n].transpose(0, 1)


def _pair_major(dense: Tensor) -> Tensor:
    """``[B, h, N, N] -> [N·N + 1, B, h]`` with a zero scratch row for padding pairs."""
    b, h, n, _ = dense.shape
    return torch.cat([dense.permute(2, 3, 0, 1).reshape(n * n, b, h), dense.new_zeros(1, b, h)], dim=0)


def _dense(pairs_t: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_pair_major`."""
    b, h = pairs_t.shape[1:]
    return pairs_t[: n * n].view(n, n, b, h).permute(2, 3, 0, 1).contiguous()


class _Scratch:
    """Named buffers reused across the chunks of one pass (plans put the largest chunk first)."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        """A contiguous ``shape`` view of buffer ``name`` (grown if needed)."""
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = self.like.new_empty(numel, dtype=dtype)
        return buffer.as_strided(shape, _contiguous_strides(shape))


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1]
    for size in reversed(shape[1:]):
        strides.append(strides[-1] * size)
    return tuple(reversed(strides))


def _bank_rows(weight: Tensor, chunk: PairChunk, scratch: _Scratch, side: str, dtype: torch.dtype) -> Tensor:
    """``[D, C_in, C_out]`` bank rows of a chunk: a view when they are a strided range."""
    if chunk.bank_slice is not None:
        rows = weight[chunk.bank_slice]
    else:
        out = scratch("w" + side, len(chunk.rows), *weight.shape[1:], dtype=weight.dtype)
        rows = torch.index_select(weight, 0, chunk.rows, out=out)
    return rows if rows.dtype == dtype else rows.to(dtype)


def _bank_grad(weight: Tensor | None, plan: PairPlan, needed: bool) -> Tensor | None:
    """A bank gradient with only the rows no pair writes zeroed: the chunks write the others."""
    if weight is None or not needed:
        return None
    grad = torch.empty_like(weight)
    grad[plan.num_rows:].zero_()
    return grad.index_fill_(0, plan.idle_rows, 0)


def _gather(x_t: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """Rows ``x_t[index]`` of a token- or pair-major tensor, written into ``out`` (returned)."""
    return torch.index_select(x_t, 0, index, out=out)


def _project(x_t: Tensor, weight: Tensor | None, index: Tensor, chunk: PairChunk, scratch: _Scratch,
             side: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(inputs, bank, outputs)``: ``[D, P·B, C]`` gathered inputs, bank rows and the projection."""
    d, p = chunk.shape
    b, c = x_t.shape[1:]
    inputs = _gather(x_t, index, scratch("x" + side, d * p, b, c)).view(d, p * b, c)
    if weight is None:
        return inputs, None, inputs
    bank = _bank_rows(weight, chunk, scratch, side, x_t.dtype)
    return inputs, bank, torch.bmm(inputs, bank, out=scratch(side, d, p * b, weight.shape[-1]))


def _project_backward(grad_outputs: Tensor, inputs: Tensor, bank: Tensor | None, side: str,
                      chunk: PairChunk, scratch: _Scratch, free: str, grad_t: Tensor,
                      weight_grad: Tensor | None) -> None:
    """Scatter-add the input gradient of a chunk's projection into ``grad_t``; write its bank rows' gradient.

    ``side`` is ``"q"`` for inputs gathered by query token, ``"k"`` by key token. The input
    gradient goes to scratch buffer ``free``, one whose contents are dead by now.
    """
    if bank is None:
        grad_inputs = grad_outputs
    else:
        grad_inputs = torch.bmm(grad_outputs, bank.transpose(1, 2), out=scratch(free, *inputs.shape))
        if weight_grad is not None:
            _write_rows(weight_grad, chunk, inputs.transpose(1, 2), grad_outputs, scratch)
    index = chunk.query_index if side == "q" else chunk.key_index
    _scatter_add(grad_t, index, grad_inputs.view(len(index), *grad_t.shape[1:]), chunk, side)


def _write_rows(weight_grad: Tensor, chunk: PairChunk, a: Tensor, b: Tensor, scratch: _Scratch) -> None:
    """``weight_grad[chunk.rows] = a @ b``, straight into the gradient when its rows are contiguous."""
    if chunk.bank_slice is not None and chunk.bank_slice.step == 1 and weight_grad.dtype == a.dtype:
        torch.bmm(a, b, out=weight_grad[chunk.bank_slice])
        return
    rows_grad = torch.bmm(a, b, out=scratch("gw", a.shape[0], a.shape[1], b.shape[2]))
    if chunk.bank_slice is not None:
        weight_grad[chunk.bank_slice].copy_(rows_grad)
    else:
        weight_grad.index_copy_(0, chunk.rows, rows_grad.to(weight_grad.dtype))


def _scatter_add(target: Tensor, index: Tensor, rows: Tensor, chunk: PairChunk, side: str) -> None:
    """``target[index] += rows``: ``index_add_``, or under ``torch.use_deterministic_algorithms`` a
    segment sum in a fixed order (:class:`~translution_dist.ops.pair_plan.Segments`) written
    to distinct targets, so that no two additions race for one row."""
    if not torch.are_deterministic_algorithms_enabled():
        target.index_add_(0, index, rows)
        return
    segments = chunk_segments(chunk)[0 if side == "q" else 1]
    sums = torch.segment_reduce(rows.index_select(0, segments.order), "sum", lengths=segments.lengths)
    target.index_add_(0, segments.targets, sums)


def _scores_forward(xq: Tensor, xk: Tensor | None, wq: Tensor | None, wk: Tensor | None, plan: PairPlan,
                    dim_head: int, scale: float) -> Tensor:
    """Dense scores of the planned pairs; ``xk=None``: keys share the queries' input."""
    b, n, _ = xq.shape
    heads = (xq.shape[-1] if wq is None else wq.shape[-1]) // dim_head
    xq_t = _token_major(xq)
    xk_t = xq_t if xk is None else _token_major(xk)
    scores_t = xq.new_zeros(n * n + 1, b, heads)
    scratch = _Scratch(xq)
    for chunk in plan.chunks:
        pairs = chunk.flat_pairs
        _, _, q = _project(xq_t, wq, chunk.query_index, chunk, scratch, "q")
        _, _, k = _project(xk_t, wk, chunk.key_index, chunk, scratch, "k")
        products = q.mul_(k).view(len(pairs), b, heads, -1)  # q is scratch, free to overwrite
        scores_t.index_copy_(0, pairs, torch.sum(products, -1, out=scratch("s", len(pairs), b, heads)))
    return _dense(scores_t, n).mul_(scale)


def _scores_backward(grad_scores: Tensor, xq: Tensor, xk: Tensor | None, wq: Tensor | None, wk: Tensor | None,
                     plan: PairPlan, dim_head: int, scale: float, need_wq: bool, need_wk: bool,
                     ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`_scores_forward`; a shared input (``xk=None``) gets the sum, as ``grad_xq``."""
    b, n, _ = xq.shape
    heads = (xq.shape[-1] if wq is None else wq.shape[-1]) // dim_head
    xq_t = _token_major(xq)
    xk_t = xq_t if xk is None else _token_major(xk)
    grad_t = _pair_major(grad_scores * scale)
    gxq_t = torch.zeros_like(xq_t)
    gxk_t = gxq_t if xk is None else torch.zeros_like(xk_t)
    gwq = _bank_grad(wq, plan, need_wq)
    gwk = _bank_grad(wk, plan, need_wk)
    scratch = _Scratch(xq)
    for chunk in plan.chunks:
        pairs = len(chunk.flat_pairs)
        xi, bank_q, q = _project(xq_t, wq, chunk.query_index, chunk, scratch, "q")
        xj, bank_k, k = _project(xk_t, wk, chunk.key_index, chunk, scratch, "k")
        g = _gather(grad_t, chunk.flat_pairs, scratch("g", pairs, b, heads)).unsqueeze(-1)
        grad_q = torch.mul(k.view(pairs, b, heads, -1), g, out=scratch("gq", pairs, b, heads, k.shape[-1] // heads))
        grad_k = q.view(pairs, b, heads, -1).mul_(g)  # q is not needed any more (nor xi, if q is xi)
        # Input gradients reuse dead buffers (k, then grad_q): five row buffers in all, as in forward + 1.
        _project_backward(grad_q.view(q.shape), xi, bank_q, "q", chunk, scratch, "k", gxq_t, gwq)
        _project_backward(grad_k.view(k.shape), xj, bank_k, "k", chunk, scratch, "gq", gxk_t, gwk)
    grad_xk = None if xk is None else _batch_major(gxk_t, n)  # a shared input gets the sum once
    return _batch_major(gxq_t, n), grad_xk, gwq, gwk


def _values_forward(attn: Tensor, xv: Tensor, wv: Tensor | None, plan: PairPlan) -> Tensor:
    b, heads, n, _ = attn.shape
    xv_t = _token_major(xv)
    attn_t = _pair_major(attn)
    out_t = xv.new_zeros(n + 1, b, xv.shape[-1] if wv is None else wv.shape[-1])
    scratch = _Scratch(xv)
    for chunk in plan.chunks:
        pairs = len(chunk.flat_pairs)
        _, _, v = _project(xv_t, wv, chunk.key_index, chunk, scratch, "v")
        a = _gather(attn_t, chunk.flat_pairs, scratch("a", pairs, b, heads)).unsqueeze(-1)
        _scatter_add(out_t, chunk.query_index, v.view(pairs, b, heads, -1).mul_(a).view(pairs, b, -1), chunk, "q")
    return _batch_major(out_t, n)


def _values_backward(grad_out: Tensor, attn: Tensor, xv: Tensor, wv: Tensor | None, plan: PairPlan,
                     need_wv: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    b, heads, n, _ = attn.shape
    xv_t = _token_major(xv)
    grad_out_t = _token_major(grad_out)
    attn_t = _pair_major(attn)
    grad_attn_t = attn.new_zeros(n * n + 1, b, heads)
    gxv_t = torch.zeros_like(xv_t)
    gwv = _bank_grad(wv, plan, need_wv)
    scratch = _Scratch(xv)
    for chunk in plan.chunks:
        pairs = len(chunk.flat_pairs)
        xj, bank_v, v = _project(xv_t, wv, chunk.key_index, chunk, scratch, "v")
        go = _gather(grad_out_t, chunk.query_index, scratch("go", pairs, b, grad_out.shape[-1])).view(
            pairs, b, heads, -1)
        products = v.view(pairs, b, heads, -1).mul_(go)  # v is not needed any more (nor xj, if v is xj)
        grad_attn_t.index_copy_(0, chunk.flat_pairs, torch.sum(products, -1, out=scratch("ga", pairs, b, heads)))
        a = _gather(attn_t, chunk.flat_pairs, scratch("a", pairs, b, heads)).unsqueeze(-1)
        grad_v = go.mul_(a).view(v.shape)
        _project_backward(grad_v, xj, bank_v, "k", chunk, scratch, "v", gxv_t, gwv)  # v is dead
    return _dense(grad_attn_t, n), _batch_major(gxv_t, n), gwv


# --- custom operators: one opaque node per kernel call for torch.compile -----------------------------------
#
# A traced graph holds the plan as a PlanSpec (ints); the operator looks the plan up when it runs.
# Fake implementations give shapes and strides only. Optional outputs come back as empty tensors
# (an operator cannot return None) and are mapped back to None by the autograd formulas.

_NO_GRAD = 0


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(_NO_GRAD)


def _batch_major_like(x: Tensor, width: int) -> Tensor:
    """An empty tensor with :func:`_batch_major`'s strides (the real outputs' layout)."""
    b, n, _ = x.shape
    return x.new_empty(n, b, width).transpose(0, 1)


def _optional(t: Tensor, present: bool) -> Tensor | None:
    return t if present else None


@torch.library.custom_op("translution::pair_scores", mutates_args=())
def _pair_scores_op(xq: Tensor, xk: Tensor | None, wq: Tensor | None, wk: Tensor | None, plan: list[int],
                    dim_head: int, scale: float) -> Tensor:
    return _scores_forward(xq, xk, wq, wk, PlanSpec(*plan).plan(xq.device), dim_head, scale)


@_pair_scores_op.register_fake
def _(xq, xk, wq, wk, plan, dim_head, scale):
    b, n, _ = xq.shape
    heads = (xq.shape[-1] if wq is None else wq.shape[-1]) // dim_head
    return xq.new_empty(b, heads, n, n)


@torch.library.custom_op("translution::pair_scores_backward", mutates_args=())
def _pair_scores_backward_op(grad: Tensor, xq: Tensor, xk: Tensor | None, wq: Tensor | None, wk: Tensor | None,
                             plan: list[int], dim_head: int, scale: float, need_wq: bool, need_wk: bool,
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gxq, gxk, gwq, gwk = _scores_backward(grad, xq, xk, wq, wk, PlanSpec(*plan).plan(xq.device), dim_head, scale,
                                          need_wq, need_wk)
    return gxq, _empty(xq) if gxk is None else gxk, _empty(xq) if gwq is None else gwq, \
        _empty(xq) if gwk is None else gwk


@_pair_scores_backward_op.register_fake
def _(grad, xq, xk, wq, wk, plan, dim_head, scale, need_wq, need_wk):
    gxk = _empty(xq) if xk is None else _batch_major_like(xk, xk.shape[-1])
    gwq = torch.empty_like(wq) if wq is not None and need_wq else _empty(xq)
    gwk = torch.empty_like(wk) if wk is not None and need_wk else _empty(xq)
    return _batch_major_like(xq, xq.shape[-1]), gxk, gwq, gwk


def _scores_setup(ctx, inputs, output) -> None:
    xq, xk, wq, wk, plan, dim_head, scale = inputs
    ctx.save_for_backward(xq, xk, wq, wk)
    ctx.plan, ctx.dim_head, ctx.scale = plan, dim_head, scale


def _scores_autograd(ctx, grad):
    xq, xk, wq, wk = ctx.saved_tensors
    need = ctx.needs_input_grad
    gxq, gxk, gwq, gwk = _pair_scores_backward_op(grad, xq, xk, wq, wk, ctx.plan, ctx.dim_head, ctx.scale,
                                                  wq is not None and need[2], wk is not None and need[3])
    return (gxq, _optional(gxk, xk is not None), _optional(gwq, wq is not None and need[2]),
            _optional(gwk, wk is not None and need[3]), None, None, None)


_pair_scores_op.register_autograd(_scores_autograd, setup_context=_scores_setup)


@torch.library.custom_op("translution::pair_values", mutates_args=())
def _pair_values_op(attn: Tensor, xv: Tensor, wv: Tensor | None, plan: list[int]) -> Tensor:
    return _values_forward(attn, xv, wv, PlanSpec(*plan).plan(xv.device))


@_pair_values_op.register_fake
def _(attn, xv, wv, plan):
    return _batch_major_like(xv, xv.shape[-1] if wv is None else wv.shape[-1])


@torch.library.custom_op("translution::pair_values_backward", mutates_args=())
def _pair_values_backward_op(grad: Tensor, attn: Tensor, xv: Tensor, wv: Tensor | None, plan: list[int],
                             need_wv: bool) -> tuple[Tensor, Tensor, Tensor]:
    gattn, gxv, gwv = _values_backward(grad, attn, xv, wv, PlanSpec(*plan).plan(xv.device), need_wv)
    return gattn, gxv, _empty(xv) if gwv is None else gwv


@_pair_values_backward_op.register_fake
def _(grad, attn, xv, wv, plan, need_wv):
    gwv = torch.empty_like(wv) if wv is not None and need_wv else _empty(xv)
    return torch.empty_like(attn, memory_format=torch.contiguous_format), _batch_major_like(xv, xv.shape[-1]), gwv


def _values_setup(ctx, inputs, output) -> None:
    attn, xv, wv, plan = inputs
    ctx.save_for_backward(attn, xv, wv)
    ctx.plan = plan


def _values_autograd(ctx, grad):
    attn, xv, wv = ctx.saved_tensors
    need_wv = wv is not None and ctx.needs_input_grad[2]
    gattn, gxv, gwv = _pair_values_backward_op(grad, attn, xv, wv, ctx.plan, need_wv)
    return gattn, gxv, _optional(gwv, need_wv), None


_pair_values_op.register_autograd(_values_autograd, setup_context=_values_setup)


def in_compute_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The kernels' inputs in one dtype: autocast's where it is on (as for a Linear), else their promoted type.

    Under autocast a plain side arrives as a low-precision projection and a relative side as a
    float32 LayerNorm output; the kernels compute in one dtype (banks are cast to it per chunk).
    The same tensor passed twice stays one tensor (a shared query/key input is recognised by
    identity, ``is``, which torch.compile traces; ``id()`` would fail its guards on every call).
    """
    device = tensors[0].device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    cast: list[tuple[Tensor, Tensor]] = []
    for t in tensors:
        if not any(t is seen for seen, _ in cast):
            cast.append((t, t.to(dtype)))
    return tuple(next(c for seen, c in cast if t is seen) for t in tensors)


def _local(weight: Tensor | None) -> Tensor | None:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _spec(plan: PairPlan | PlanSpec) -> list[int]:
    spec = plan.spec if isinstance(plan, PairPlan) else plan
    if spec is None:
        raise ValueError("a PairPlan passed to the kernels must come from pair_plan (it carries its PlanSpec)")
    return list(spec)


def pair_scores(
    xq: Tensor, xk: Tensor, wq: Tensor | None, wk: Tensor | None, plan: PairPlan | PlanSpec, dim_head: int,
    scale: float,
) -> Tensor:
    """Dense ``[B, h, N, N]`` scores ``scale·⟨q_ij, k_ij⟩`` of the planned pairs, zero elsewhere.

    ``xq``/``xk`` are ``[B, N, C_in]`` inputs of relative sides (with ``[D, C_in, C']``
    banks ``wq``/``wk`` whose rows the plan names) or ``[B, N, C']`` projections of plain
    sides (weight ``None``). ``plan`` is a plan from :func:`pair_plan` or its
    :class:`PlanSpec` (what a module passes, so that torch.compile sees ints only).
    """
    xq, xk = in_compute_dtype(xq, xk)
    return _pair_scores_op(xq, None if xk is xq else xk, _local(wq), _local(wk), _spec(plan), dim_head, scale)


def pair_values(attn: Tensor, xv: Tensor, wv: Tensor | None, plan: PairPlan | PlanSpec) -> Tensor:
    """``[B, N, C']`` outputs ``o_i = Σ_j a_ij·v_ij`` over the planned pairs, heads concatenated."""
    attn, xv = in_compute_dtype(attn, xv)
    return _pair_values_op(attn, xv, _local(wv), _spec(plan))


# --- FLOP formulas: the operators are opaque to torch.utils.flop_counter, so they state their bmm FLOPs -------


def _bank_flops(plan: list[int], x_shape, w_shape, passes: int) -> int:
    """``passes`` per-pair projections ``[B, C_in] @ [C_in, C_out]`` over the plan's padded pairs."""
    if w_shape is None:
        return 0
    padded = sum(chunk.flat_pairs.numel() for chunk in PlanSpec(*plan).plan().chunks)
    return passes * 2 * padded * x_shape[0] * w_shape[1] * w_shape[2]


@register_flop_formula(torch.ops.translution.pair_scores)
def _scores_flops(xq_shape, xk_shape, wq_shape, wk_shape, plan, *args, **kwargs) -> int:
    return _bank_flops(plan, xq_shape, wq_shape, 1) + _bank_flops(plan, xq_shape, wk_shape, 1)


@register_flop_formula(torch.ops.translution.pair_scores_backward)
def _scores_backward_flops(grad_shape, xq_shape, xk_shape, wq_shape, wk_shape, plan, dim_head, scale, need_wq,
                           need_wk, *args, **kwargs) -> int:
    # per bank side: the projection again, the input gradient, and the bank gradient when needed
    return (_bank_flops(plan, xq_shape, wq_shape, 2 + need_wq) + _bank_flops(plan, xq_shape, wk_shape, 2 + need_wk))


@register_flop_formula(torch.ops.translution.pair_values)
def _values_flops(attn_shape, xv_shape, wv_shape, plan, *args, **kwargs) -> int:
    return _bank_flops(plan, xv_shape, wv_shape, 1)


@register_flop_formula(torch.ops.translution.pair_values_backward)
def _values_backward_flops(grad_shape, attn_shape, xv_shape, wv_shape, plan, need_wv, *args, **kwargs) -> int:
    return _bank_flops(plan, xv_shape, wv_shape, 2 + need_wv)
