"""Attention layers: Translution, α-Translution and the self-attention baselines.

Every layer is pre-norm (it LayerNorms its input) and returns the residual branch. The
layers know nothing of parallelism: banks are plain parameters in per-chunk modules, head
counts follow from the width in hand (``dim_head`` is fixed), and the only hooks sharding
code uses are the attributes named in :class:`RelativeAttentionBase` and ``_BankChunk``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translution_dist.ops import (
    DisplacementBank,
    ImageGridLayout,
    PlanSpec,
    RelativeLayout,
    in_compute_dtype,
    pair_scores,
    pair_values,
    pairs_per_chunk,
)
from translution_dist.ops.layouts import layout_id

RELATIVE_SUBSETS = ("q", "k", "v", "qk", "qv", "kv", "qkv")
DEFAULT_PAIR_CHUNK_BYTES = 64 << 20
"""Memory one step of the kernels may use for per-pair rows (see ``translution_dist.ops.pair_plan``)."""


def _split_heads(x: Tensor, dim_head: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, -1, dim_head).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


def allowed_pairs(layout: RelativeLayout) -> Tensor:
    """``[T, T]`` bool for the layout's longest sequence (``T = max_tokens``); a shorter causal
    sequence's mask is its top-left corner."""
    key_index, _ = layout.index_maps(layout.max_tokens)
    return key_index >= 0


def register_layout_buffer(module: nn.Module, name: str, host: Tensor | None) -> None:
    """A non-persistent buffer computed from the layout: built once (here, on the default device,
    meta included) so that no forward copies it from the host; ``reset_parameters`` refills it."""
    buffer = None if host is None else torch.empty(host.shape, dtype=host.dtype)
    module.register_buffer(name, buffer, persistent=False)
    fill_layout_buffer(module, name, lambda: host)


@torch.no_grad()
def fill_layout_buffer(module: nn.Module, name: str, compute: Callable[[], Tensor]) -> None:
    buffer = getattr(module, name)
    if buffer is not None and buffer.device.type != "meta":
        buffer.copy_(compute())


def chunk_bounds(num_rows: int, num_chunks: int) -> list[tuple[int, int]]:
    """Split ``num_rows`` bank rows into ``num_chunks`` contiguous, near-equal ranges."""
    if not 1 <= num_chunks <= num_rows:
        raise ValueError(f"bank_chunks must be between 1 and K={num_rows}, got {num_chunks}")
    edges = [num_rows * c // num_chunks for c in range(num_chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


class _BankChunk(nn.Module):
    """Bank rows ``[start, stop)`` (in ``layout.storage_order``) of some projections.

    One chunk is one unit of gathering for ZeRO-3: its forward is the only place its
    weights are used, so FSDP2 and DeepSpeed gather, use and free one chunk at a time.
    Displacement parallelism narrows ``rows`` to the rows this rank holds.
    """

    def __init__(self, layout: RelativeLayout, start: int, stop: int, in_features: int, out_features: int,
                 sides: str, dim_head: int) -> None:
        super().__init__()
        self.layout = layout
        self.layout_id = layout_id(layout)  # what the kernels' custom operators take (an int)
        self.rows = (start, stop)
        self.dim_head = dim_head
        self.pair_chunk_bytes = DEFAULT_PAIR_CHUNK_BYTES
        for side in sides:
            self.add_module(side, DisplacementBank(stop - start, in_features, out_features))

    def _weight(self, side: str) -> Tensor | None:
        bank = getattr(self, side, None)
        return None if bank is None else bank.weight

    def _plan(self, n: int, batch: int, bytes_per_pair_row: int) -> PlanSpec:
        """The plan as ints (built by the kernel when it runs; never traced by torch.compile)."""
        budget = pairs_per_chunk(batch, bytes_per_pair_row, self.pair_chunk_bytes)
        return PlanSpec(self.layout_id, n, budget, *self.rows)


class ScoreBankChunk(_BankChunk):
    """Query/key bank rows of one chunk; forward gives its pairs' dense scores."""

    def forward(self, xq: Tensor, xk: Tensor, scale: float) -> Tensor:
        b, n, _ = xq.shape
        wq, wk = self._weight("q"), self._weight("k")
        width = xq.shape[-1] + xk.shape[-1] + 2 * max(w.shape[-1] for w in (wq, wk) if w is not None)
        plan = self._plan(n, b, xq.element_size() * width)
        return pair_scores(xq, xk, wq, wk, plan, self.dim_head, scale)


class ValueBankChunk(_BankChunk):
    """Value bank rows of one chunk; forward gives its pairs' weighted values."""

    def forward(self, attn: Tensor, xv: Tensor) -> Tensor:
        b, _, n, _ = attn.shape
        wv = self._weight("v")
        plan = self._plan(n, b, xv.element_size() * 2 * (xv.shape[-1] + wv.shape[-1]))
        return pair_values(attn, xv, wv, plan)


class RelativeAttentionBase(nn.Module):
    """Shared machinery of the layers with displacement banks.

    Banks live in ``score_banks`` (query/key rows) and ``value_banks`` (value rows), one
    module per displacement chunk. Sharding code may replace ``row_softmax``, the softmax
    over keys: displacement parallelism completes it across the ranks that hold the other
    displacements.
    """

    def __init__(self, layout: RelativeLayout, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layout = layout
        self.dim_head = dim_head
        self.row_softmax: Callable[[Tensor, Tensor | None], Tensor] = _masked_softmax
        self.attn_dropout = nn.Dropout(dropout)
        register_layout_buffer(self, "allowed", None if layout.all_pairs_allowed else allowed_pairs(layout))

    def reset_parameters(self) -> None:
        """Fill the computed buffers (also after ``to_empty`` from the meta device)."""
        fill_layout_buffer(self, "allowed", lambda: allowed_pairs(self.layout))

    def attention_mask(self, n: int) -> Tensor | None:
        """``[n, n]`` bool on the layer's device, True where a pair is allowed; ``None`` when all are."""
        return None if self.allowed is None else self.allowed[:n, :n]

    def _attend(self, scores: Tensor) -> Tensor:
        """Attention probabilities (softmax over the allowed keys), with dropout."""
        return self.attn_dropout(self.row_softmax(scores, self.attention_mask(scores.shape[-1])))

    def _make_banks(self, sides: str, in_features: int, out_features: int, bank_chunks: int, dim_head: int) -> None:
        bounds = chunk_bounds(self.layout.num_displacements, bank_chunks)
        score_sides = "".join(c for c in "qk" if c in sides)
        self.score_banks = nn.ModuleList(
            ScoreBankChunk(self.layout, a, b, in_features, out_features, score_sides, dim_head) for a, b in bounds
        ) if score_sides else None
        self.value_banks = nn.ModuleList(
            ValueBankChunk(self.layout, a, b, in_features, out_features, "v", dim_head) for a, b in bounds
        ) if "v" in sides else None

    def _relative_scores(self, xq: Tensor, xk: Tensor, scale: float) -> Tensor:
        xq, xk = in_compute_dtype(xq, xk)  # once for every chunk (under autocast: one low-precision copy)
        return _sum(chunk(xq, xk, scale) for chunk in self.score_banks)

    def _relative_values(self, attn: Tensor, xv: Tensor) -> Tensor:
        attn, xv = in_compute_dtype(attn, xv)
        return _sum(chunk(attn, xv) for chunk in self.value_banks)

    def bank(self, side: str) -> Tensor:
        """The whole ``[K, C_in, C_out]`` bank of ``side`` in displacement order (differentiable)."""
        banks = self.value_banks if side == "v" else self.score_banks
        rows = torch.cat([getattr(chunk, side).weight for chunk in banks], dim=0)
        return rows[self.layout.storage_row.to(rows.device)]

    @torch.no_grad()
    def load_bank(self, side: str, weight: Tensor) -> None:
        """Set ``side``'s bank from a ``[K, C_in, C_out]`` tensor in displacement order."""
        banks = self.value_banks if side == "v" else self.score_banks
        stored = weight[self.layout.storage_order.to(weight.device)]
        for chunk in banks:
            start, stop = chunk.rows
            getattr(chunk, side).weight.copy_(stored[start:stop])


def bank_chunk_modules(module: nn.Module) -> list[_BankChunk]:
    """The bank chunk modules under ``module`` in forward order: ZeRO-3's gather unit, sharding's target."""
    return [sub for sub in module.modules() if isinstance(sub, _BankChunk)]


def set_pair_chunk_bytes(module: nn.Module, nbytes: int) -> None:
    """Bound the per-pair working memory of every bank chunk under ``module``."""
    for sub in module.modules():
        if isinstance(sub, _BankChunk):
            sub.pair_chunk_bytes = nbytes


def _sum(parts) -> Tensor:
    total = None
    for part in parts:
        total = part if total is None else total + part
    return total


class TranslutionAttention(RelativeAttentionBase):
    """Full Translution: each of the ``relative`` projections (a subset of q, k, v) is a bank
    ``[K, C, C']``; the others are plain ``Linear(C, C')``.

    ``q_ij = x_i·Wq[d(i,j)]``, ``k_ij = x_j·Wk[d(i,j)]``, ``v_ij = x_j·Wv[d(i,j)]`` with ``d``
    the key-side displacement (the query bank is stored in key-side order),
    ``a = softmax_j(⟨q_ij, k_ij⟩/√d_head)`` per head, ``o_i = Σ_j a_ij·v_ij``. With ``rotary``
    (``relative='v'`` only) the plain queries and keys are rotated first.
    """

    def __init__(self, layout: RelativeLayout, dim: int, heads: int, dim_head: int, relative: str = "qkv",
                 bank_chunks: int = 1, dropout: float = 0.0, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__(layout, dim_head, dropout)
        if relative not in RELATIVE_SUBSETS:
            raise ValueError(f"relative must be one of {RELATIVE_SUBSETS}, got {relative!r}")
        if rotary is not None and relative != "v":
            raise ValueError(f"a rotary embedding needs plain queries and keys (relative='v'), got {relative!r}")
        inner_dim = heads * dim_head
        self.relative = relative
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        for side in "qkv":
            if side not in relative:
                self.add_module(f"{side}_proj", nn.Linear(dim, inner_dim, bias=False))
        self._make_banks(relative, dim, inner_dim, bank_chunks, dim_head)
        self.rotary = rotary
        self.out_proj = output_projection(heads, dim_head, dim)
        self.out_dropout = nn.Dropout(dropout)

    def _plain(self, side: str, x: Tensor) -> Tensor:
        """Input of a relative side, projection of a plain one."""
        return x if side in self.relative else getattr(self, f"{side}_proj")(x)

    def forward(self, x: Tensor) -> Tensor:
        (x,) = in_compute_dtype(self.norm(x))  # under autocast one low-precision copy serves every side
        xq, xk, xv = (self._plain(side, x) for side in "qkv")
        if self.score_banks is None:
            q, k = _split_heads(xq, self.dim_head), _split_heads(xk, self.dim_head)
            if self.rotary is not None:
                q, k = self.rotary(q), self.rotary(k)
            scores = q @ k.transpose(-1, -2) * self.scale
        else:
            scores = self._relative_scores(xq, xk, self.scale)
        attn = self._attend(scores)
        if self.value_banks is None:
            out = _merge_heads(attn @ _split_heads(xv, self.dim_head))
        else:
            out = self._relative_values(attn, xv)
        return self.out_dropout(self.out_proj(out))


class AlphaTranslutionAttention(RelativeAttentionBase):
    """α-Translution: attention plus a rank-``r`` (per head) Translution term on the ``relative`` sides.

    With ``q1, k1, v1`` the attention's projections, the score term (present when q or k is
    relative) is ``s_ij = (⟨q1_i, k1_j⟩ + ⟨q2_ij, k2_ij⟩)/2/√d_head`` with
    ``q2_ij = (x_i·Dq)·Wq2[d(i,j)]`` and ``k2_ij = (x_j·Dk)·Wk2[d(i,j)]``, a side that is not
    relative using its low-rank projection alone (``q2_i = x_i·Dq``); without it
    ``s_ij = ⟨q1_i, k1_j⟩/√d_head``. The value term (``v`` relative) gives
    ``o_i = (Σ_j a_ij·v1_j + U·Σ_j a_ij·v2_ij)/2`` with ``v2_ij = (x_j·Dv)·Wv2[d(i,j)]``;
    without it ``o_i = Σ_j a_ij·v1_j``. ``D*`` are ``Linear(C, h·r)``, banks ``[K, h·r, h·r]``,
    ``U`` is ``Linear(h·r, C')``; the output goes through ``out_proj``. With ``rotary`` ``q1`` and
    ``k1`` are rotated.
    """

    def __init__(self, layout: RelativeLayout, dim: int, heads: int, dim_head: int, rank: int = 8,
                 bank_chunks: int = 1, relative: str = "qkv", dropout: float = 0.0,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__(layout, dim_head, dropout)
        if relative not in RELATIVE_SUBSETS:
            raise ValueError(f"relative must be one of {RELATIVE_SUBSETS}, got {relative!r}")
        inner_dim = heads * dim_head
        low = heads * rank
        self.rank = rank
        self.relative = relative
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv_proj = nn.Linear(dim, 3 * inner_dim, bias=False)
        self.rotary = rotary
        score_term = "q" in relative or "k" in relative
        for side in ("qk" if score_term else "") + ("v" if "v" in relative else ""):
            self.add_module(f"{side}_down", nn.Linear(dim, low, bias=False))
        self._make_banks(relative, low, low, bank_chunks, rank)
        if "v" in relative:
            self.v_up = nn.Linear(low, inner_dim, bias=False)
        self.out_proj = output_projection(heads, dim_head, dim)
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        q1, k1, v1 = (_split_heads(t, self.dim_head) for t in self.qkv_proj(x).chunk(3, dim=-1))
        if self.rotary is not None:
            q1, k1 = self.rotary(q1), self.rotary(k1)
        if self.score_banks is None:
            scores = q1 @ k1.transpose(-1, -2) * self.scale
        else:
            half_scale = self.scale / 2
            scores = q1 @ k1.transpose(-1, -2) * half_scale
            scores = scores + self._relative_scores(self.q_down(x), self.k_down(x), half_scale)
        attn = self._attend(scores)
        out = _merge_heads(attn @ v1)
        if self.value_banks is not None:
            out = (out + self.v_up(self._relative_values(attn, self.v_down(x)))) / 2
        return self.out_dropout(self.out_proj(out))


class SelfAttention(nn.Module):
    """The paper's self-attention baseline; ``position`` is ``none``, ``rope`` or ``relative_bias``.

    (A learned absolute position embedding belongs to the model, not the layer.)
    """

    def __init__(self, layout: RelativeLayout, dim: int, heads: int, dim_head: int, position: str = "none",
                 causal: bool = False, dropout: float = 0.0, rope_convention: str = "project") -> None:
        super().__init__()
        if position not in ("none", "rope", "relative_bias"):
            raise ValueError(f"position must be none, rope or relative_bias, got {position!r}")
        inner_dim = heads * dim_head
        self.layout = layout
        self.dim_head = dim_head
        self.position = position
        self.causal = causal
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv_proj = nn.Linear(dim, 3 * inner_dim, bias=False)
        self.out_proj = output_projection(heads, dim_head, dim)
        self.out_dropout = nn.Dropout(dropout)
        if position == "relative_bias":
            self.bias_table = nn.Parameter(torch.empty(layout.num_displacements, heads))
        register_layout_buffer(self, "key_index", layout.index_maps(layout.max_tokens)[0]
                               if position == "relative_bias" else None)
        self.rotary = RotaryEmbedding(layout, dim_head, rope_convention) if position == "rope" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise what this layer owns directly (also after ``to_empty`` from the meta device)."""
        if self.position == "relative_bias":
            nn.init.trunc_normal_(self.bias_table, std=0.02)
        fill_layout_buffer(self, "key_index", lambda: self.layout.index_maps(self.layout.max_tokens)[0])

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        q, k, v = (_split_heads(t, self.dim_head) for t in self.qkv_proj(self.norm(x)).chunk(3, dim=-1))
        mask = None
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        if self.position == "relative_bias":
            key_index = self.key_index[:n, :n]
            mask = self.bias_table[key_index.clamp(min=0)].permute(2, 0, 1).to(q.dtype)
            if self.causal:
                mask = mask.masked_fill(key_index < 0, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=self.causal and mask is None)
        return self.out_dropout(self.out_proj(_merge_heads(out)))


def output_projection(heads: int, dim_head: int, dim: int) -> nn.Module:
    """``Linear(h·d, C)``, or the identity for a single head as wide as the model (as the official ``to_out``)."""
    if heads == 1 and dim_head == dim:
        return nn.Identity()
    return nn.Linear(heads * dim_head, dim)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) of ``[B, h, N, d]`` queries or keys.

    Text rotates by the token index; an image grid splits the head dimension between rows and
    columns and leaves the class token unrotated. Channel pair ``p`` turns by ``pos·f_p``, with
    ``f_p = 10000^(−2p/d')`` over the ``d' = d/axes`` channels of its axis. ``convention``:

    * ``"project"`` — pair ``p`` is channels ``(2p, 2p+1)``; patches sit at ``(row+1, col+1)``.
    * ``"official"`` — pair ``p`` is channels ``(p, p + d/2)`` (the official ``rotate_half``);
      patches sit at ``(row, col)``, as the official ``RoPE2DWithCLS`` places them.
    """

    def __init__(self, layout: RelativeLayout, dim_head: int, convention: str = "project") -> None:
        super().__init__()
        if convention not in ("project", "official"):
            raise ValueError(f"rope convention must be project or official, got {convention!r}")
        self.layout = layout
        self.convention = convention
        self.axes = 2 if isinstance(layout, ImageGridLayout) else 1
        if dim_head % (2 * self.axes):
            raise ValueError(f"rope needs dim_head divisible by {2 * self.axes}, got {dim_head}")
        self.register_buffer("freqs", torch.empty(dim_head // self.axes // 2), persistent=False)
        register_layout_buffer(self, "positions", self._positions())
        self.reset_parameters()

    def _positions(self) -> Tensor:
        """Integer positions, kept as int64 so that casting the model (``.to(bfloat16)``) cannot round them."""
        origin = 1 if self.convention == "project" else 0
        return rope_positions(self.layout, self.layout.max_tokens, origin).long()

    def reset_parameters(self) -> None:
        if self.freqs.device.type != "meta":
            with torch.no_grad():
                self.freqs.copy_(rope_frequencies(self.freqs.numel() * 2))
        fill_layout_buffer(self, "positions", self._positions)

    def angles(self, n: int) -> Tensor:
        """``[n, d/2]`` float32 angles, pair by pair (an image grid's row pairs first)."""
        freqs = self.freqs.float()  # float32 even in a float64 model: the official caches are float32
        return (self.positions[:n].float()[:, :, None] * freqs).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        angles = self.angles(x.shape[-2])
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        if self.convention == "official":
            first, second = x.chunk(2, dim=-1)
            return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    def extra_repr(self) -> str:
        return f"axes={self.axes}, convention={self.convention}"


def rope_frequencies(rotary_dim: int) -> Tensor:
    """The ``rotary_dim/2`` frequencies ``10000^(−2p/rotary_dim)``, float32 as the official code."""
    return 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def rope_positions(layout: RelativeLayout, n: int, origin: int = 1) -> Tensor:
    """``[n, axes]`` float32 positions: the token index for text; for patches (row, col) + ``origin``,
    the class token at zero (unrotated)."""
    if not isinstance(layout, ImageGridLayout):
        return torch.arange(n, dtype=torch.float32)[:, None]
    rows = torch.arange(layout.height).repeat_interleave(layout.width)
    cols = torch.arange(layout.width).repeat(layout.height)
    grid = torch.stack([rows, cols], dim=1).float() + origin
    return torch.cat([torch.zeros(1, 2), grid], dim=0)
