"""Translution operators: relative layouts, displacement banks and exact memory-bounded kernels."""

from translution_dist.ops.bank import DisplacementBank
from translution_dist.ops.layouts import CausalLayout, ImageGridLayout, RelativeLayout
from translution_dist.ops.pair_plan import PairChunk, PairPlan, PlanSpec, pair_plan, pairs_per_chunk, plan_spec
from translution_dist.ops.relative_attention import in_compute_dtype, pair_scores, pair_values

__all__ = [
    "CausalLayout",
    "DisplacementBank",
    "ImageGridLayout",
    "PairChunk",
    "PairPlan",
    "PlanSpec",
    "RelativeLayout",
    "in_compute_dtype",
    "pair_plan",
    "pairs_per_chunk",
    "plan_spec",
    "pair_scores",
    "pair_values",
]
