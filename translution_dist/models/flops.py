"""FLOPs of a training step, counted from a model config's widths: for MFU and step-time estimates.

Two counts, both per sample (one sequence of ``N = layout.max_tokens`` tokens, or one image):

* **model FLOPs** (:func:`model_flops_per_sample`) — what MFU divides by: forward plus backward
  at 3× the forward, the usual convention. For full Translution the per-pair projections are
  ``2·P·C·C'`` per relative side (``P`` allowed token pairs), so full (q, k, v) Translution
  counts 9 units of ``2·P·C·C'`` per block, as ``docs/benchmarks.md`` does.
* **executed FLOPs** (:func:`executed_flops_per_sample`) — what the hardware runs: the model
  FLOPs plus the forward of every per-pair projection once more, because the kernels'
  backward recomputes them instead of storing them (12 units instead of 9). This is what a
  step's compute time is made of.

Only multiply–adds are counted (2 FLOPs each): linear maps, the per-pair projections, the
attention products (dense ``q·kᵀ`` and ``a·v`` over all ``N²`` entries as issued, masked or
not; the kernels' per-pair dot products and weighted sums over the allowed pairs only).
LayerNorm, softmax, GELU, the loss and the optimizer are elementwise and left out, as in the
usual MFU convention. Pair-chunk padding (~1 %) is left out too.

Each term says how model parallelism divides it (``split``), so the planner can charge one
rank its share without this module knowing about parallelism:

* ``pairs`` — per-pair work (bank projections, per-pair products): divided by ``tp·dispp``;
* ``heads`` — dense work split by heads or MLP columns (``tp``) and repeated on every
  ``dispp`` rank (plain projections, dense attention products, ``out_proj``, the MLP);
* ``root`` — the embeddings/head: repeated on every rank (the head splits under vocabulary
  parallelism).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from translution_dist.models.config import BANK_ATTENTIONS, MIXERS, ModelConfig
from translution_dist.ops import RelativeLayout

Split = Literal["pairs", "heads", "root"]
BACKWARD_FACTOR = 2
"""A matmul's backward: the input gradient and the weight gradient, each as costly as the forward."""


@dataclass(frozen=True)
class FlopTerm:
    """Forward FLOPs of one kind of work for one sample, summed over the blocks."""

    name: str
    forward: float
    split: Split
    matmul: bool  # issued as mm/bmm/SDPA (what a profiler's FLOP counter sees), not as elementwise ops
    recomputed: bool = False  # the backward runs this forward again (the kernels' per-pair projections)

    @property
    def model(self) -> float:
        """Forward + backward, as MFU counts it."""
        return (1 + BACKWARD_FACTOR) * self.forward

    @property
    def executed(self) -> float:
        """Forward + backward as the kernels run it, recomputation included."""
        return self.model + (self.forward if self.recomputed else 0.0)


@functools.lru_cache(maxsize=64)
def allowed_pairs(layout: RelativeLayout) -> int:
    """``P``: the (query, key) pairs a full sequence attends to (``N²`` on a grid, ``N(N+1)/2`` causal)."""
    key_index, _ = layout.index_maps(layout.max_tokens)
    return int((key_index >= 0).sum())


def flop_terms(cfg: ModelConfig, pairs: int | None = None) -> list[FlopTerm]:
    """Every term of one sample's forward, the blocks' summed over the depth.

    ``pairs``: the token pairs per bank the kernels run, when known with their padding (the
    sum of a model's pair-plan chunk shapes); default: the allowed pairs.
    """
    d = cfg.dims
    layout = cfg.layout()
    n, c, inner, depth = layout.max_tokens, d.dim, d.heads * d.dim_head, d.depth
    relative_blocks = cfg.num_relative_blocks
    if cfg.attention not in BANK_ATTENTIONS:
        pairs = 0
    elif pairs is None:
        pairs = allowed_pairs(layout)
    dense_products = 2 * 2 * n * n * inner  # q·kᵀ and a·v over every entry
    terms: list[FlopTerm] = []

    def block(name: str, forward: float, split: Split, matmul: bool = True, recomputed: bool = False,
              blocks: int = depth) -> None:
        if forward and blocks:
            terms.append(FlopTerm(name, blocks * forward, split, matmul, recomputed))

    def relative(name: str, forward: float, split: Split, matmul: bool = True, recomputed: bool = False) -> None:
        block(name, forward, split, matmul, recomputed, blocks=relative_blocks)

    relative_sides = cfg.relative
    scores_rel = "q" in relative_sides or "k" in relative_sides
    if cfg.attention == "translution":
        relative("bank projections (per pair)", len(relative_sides) * 2 * pairs * c * inner, "pairs", recomputed=True)
        relative("plain q/k/v projections", (3 - len(relative_sides)) * 2 * n * c * inner, "heads")
        relative("per-pair products (scores, values)",
                 (scores_rel + ("v" in relative_sides)) * 2 * pairs * inner, "pairs", matmul=False)
        relative("dense attention products",
                 ((not scores_rel) + ("v" not in relative_sides)) * 2 * n * n * inner, "heads")
    elif cfg.attention == "alpha":
        low = d.heads * cfg.alpha_rank
        downs = 2 * scores_rel + ("v" in relative_sides)
        relative("bank projections (per pair)", len(relative_sides) * 2 * pairs * low * low, "pairs", recomputed=True)
        relative("qkv and down projections", 2 * n * c * (3 * inner + downs * low), "heads")
        relative("per-pair products (scores, values)",
                 (scores_rel + ("v" in relative_sides)) * 2 * pairs * low, "pairs", matmul=False)
        relative("dense attention products", dense_products, "heads")
        relative("v_up projection", ("v" in relative_sides) * 2 * n * low * inner, "heads")
    elif cfg.attention == "acmix":
        block("qkv projection", 2 * n * c * 3 * inner, "heads")
        block("shift fc (k² maps per head from 3h features)",
              2 * n * d.dim_head * 3 * d.heads * cfg.mixer_kernel ** 2 * d.heads, "heads")
        block("dense attention products (window-masked)", dense_products, "heads")
    elif cfg.attention == "shift_structure":
        block("qkv projection", 2 * n * c * 3 * inner, "heads")
        block("dense attention products", dense_products, "heads")
        block("shift-matrix products (Σ λ_δ S_δ)·V", 2 * n * n * inner, "heads")
    elif cfg.attention == "uniformer":
        local, patches = cfg.num_local_blocks, cfg.num_patches
        block("DPE depthwise 3×3 convolution", 2 * patches * c * 3 * 3, "heads")
        block("local MHRA v and u projections", 2 * 2 * n * c * inner, "heads", blocks=local)
        block("local MHRA depthwise k×k affinity", 2 * patches * inner * cfg.mixer_kernel ** 2, "heads", blocks=local)
        block("global MHRA qkv projection", 2 * n * c * 3 * inner, "heads", blocks=depth - local)
        block("dense attention products (global MHRA)", dense_products, "heads", blocks=depth - local)
    elif cfg.attention == "mixformer":
        half, reduced = inner // 2, max(1, c // 8)
        block("branch projections (attention in, convolution in and out)", 2 * n * c * (half + c + half), "heads")
        block("depthwise 3×3 convolution", 2 * cfg.num_patches * c * 3 * 3, "heads")
        block("qkv projection", 2 * n * half * 3 * half, "heads")
        block("channel interaction", 2 * (c * reduced + reduced * half), "heads")
        block("spatial interaction", 2 * n * (half * max(1, half // 8) + max(1, half // 8)), "heads")
        block("dense attention products (window-masked)", 2 * 2 * n * n * half, "heads")
    # self-attention: all blocks; a hybrid's plain blocks; a mixer: none
    plain_blocks = 0 if cfg.attention in MIXERS else depth - relative_blocks
    hybrid = " (self-attention blocks)" if relative_blocks else ""
    block(f"qkv projection{hybrid}", 2 * n * c * 3 * inner, "heads", blocks=plain_blocks)
    block(f"dense attention products{hybrid}", dense_products, "heads", blocks=plain_blocks)
    if cfg.attention != "uniformer":  # its local blocks count u with v
        block("out_proj", (d.heads > 1 or d.dim_head != c) * 2 * n * inner * c, "heads")  # the identity otherwise
    else:
        block("global MHRA out_proj", (d.heads > 1 or d.dim_head != c) * 2 * n * inner * c, "heads",
              blocks=depth - cfg.num_local_blocks)
    block("feed-forward", 2 * 2 * n * c * d.mlp_dim, "heads")
    if cfg.arch == "gpt":
        terms.append(FlopTerm("head", 2 * n * c * cfg.vocab_size, "root", True))
    else:
        patch_h, patch_w = cfg.patch_hw
        terms.append(FlopTerm("patch embedding", 2 * cfg.num_patches * patch_h * patch_w * cfg.channels * c, "root",
                              True))
        terms.append(FlopTerm("head", 2 * c * cfg.num_classes, "root", True))
    return terms


def model_flops_per_sample(cfg: ModelConfig) -> float:
    """FLOPs MFU counts for one sample's forward + backward (3× forward; no recomputation)."""
    return sum(t.model for t in flop_terms(cfg))


def executed_flops_per_sample(cfg: ModelConfig) -> float:
    """FLOPs one sample's forward + backward executes (model FLOPs + the recomputed per-pair projections)."""
    return sum(t.executed for t in flop_terms(cfg))


def tokens_per_sample(cfg: ModelConfig) -> int:
    """Tokens one sample carries (a GPT's context, a ViT's patches and class token)."""
    return cfg.layout().max_tokens
