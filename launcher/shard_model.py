"""Which slice of every parameter a rank holds under a layout, computed without a process group.

The memory planner needs per-rank parameter bytes for layouts it only considers, so it
cannot run the sharding code. Instead, :func:`census` builds the model once on the meta
device and records every parameter's exact shape and the role the sharding code gives it
(the rules of ``parallelism.tensor_parallel``, ``parallelism.displacement_parallel`` and
``parallelism.fsdp``); :func:`local_shape` applies those rules for one rank's mesh
coordinates. ``tests/test_scale_dry_run.py`` checks the result against the real sharding
code on a fake process group, rank by rank, so the two cannot drift apart silently.

Every split follows ``torch.chunk`` (what DTensor ``Shard`` and FSDP2 use): ``n`` rows over
``k`` ranks give ``ceil(n/k)`` rows to the first ranks and what is left (possibly none) to
the others. FSDP2 allocates every rank's shard at the padded size ``ceil(n/k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from parallelism.config import ParallelConfig
from parallelism.tensor_parallel import plain_low_rank_sides
from translution_dist.models import ModelConfig, build_model
from translution_dist.models.attention import (
    AlphaTranslutionAttention,
    ScoreBankChunk,
    SelfAttention,
    TranslutionAttention,
    ValueBankChunk,
)
from translution_dist.models.blocks import Block, FeedForward

Role = Literal["bank", "colwise", "rowwise", "rowwise_bias", "vocab", "replicated"]
"""How head (tensor) parallelism splits a parameter:

* ``bank``: ``[rows, C_in, C_out]`` split by heads on dim 2, rows split by ``dispp`` on dim 0;
* ``colwise``: a column-parallel weight ``[out, in]`` or bias ``[out]``, split on dim 0;
* ``rowwise``: a row-parallel weight ``[out, in]``, split on dim 1; its bias is replicated;
* ``vocab``: ``vocab_parallel`` embedding/head weights ``[V, C]``, split on dim 0;
* ``replicated``: every tensor-parallel rank holds all of it.
"""


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as the sharding code sees it."""

    name: str
    shape: tuple[int, ...]
    role: Role
    unit: str  # FSDP2 gather unit: "root", "block.<i>" or "chunk.<i>.<score|value>.<c>"
    element_size: int = 4
    linear_weight: bool = False  # the weight of an nn.Linear (autocast keeps a low-precision copy of it)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Census:
    """Every parameter of a model config, from the model built on the meta device."""

    params: tuple[ParamInfo, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def numel_by_component(self) -> dict[str, int]:
        """Elements per component: banks by side, attention projections, feed-forward, norms, embeddings/head."""
        out: dict[str, int] = {}
        for p in self.params:
            key = _component(p)
            out[key] = out.get(key, 0) + p.numel
        return out

    def units(self) -> dict[str, list[ParamInfo]]:
        groups: dict[str, list[ParamInfo]] = {}
        for p in self.params:
            groups.setdefault(p.unit, []).append(p)
        return groups


def _component(p: ParamInfo) -> str:
    leaf = p.name.rsplit(".", 2)
    if p.role == "bank":
        return f"banks ({leaf[-2]})"
    if ".attn." in p.name and "norm" not in p.name:
        return "attention projections"
    if ".ff." in p.name and "norm" not in p.name:
        return "feed-forward"
    if "norm" in p.name:
        return "layer norms"
    return "embeddings and head"


def _linear_roles(module: nn.Module) -> dict[str, Role]:
    """Roles of the plain linear maps that ``apply_tensor_parallel`` parallelizes in ``module``."""
    roles: dict[str, Role] = {}
    if isinstance(module, TranslutionAttention):
        roles = {f"{side}_proj": "colwise" for side in "qkv" if side not in module.relative}
    elif isinstance(module, AlphaTranslutionAttention):
        roles = {"qkv_proj": "colwise", "v_up": "colwise", **dict.fromkeys(
            (f"{side}_down" for side in plain_low_rank_sides(module)), "colwise")}
    elif isinstance(module, SelfAttention):
        roles = {"qkv_proj": "colwise"}
    elif isinstance(module, FeedForward):
        return {"up_proj": "colwise", "down_proj": "rowwise"}
    else:
        return {}
    roles["out_proj"] = "rowwise"
    return {name: role for name, role in roles.items() if isinstance(getattr(module, name, None), nn.Linear)}


def census(model_config: ModelConfig, vocab_parallel: bool = False) -> Census:
    """Parameter shapes, tensor-parallel roles and FSDP2 units of ``model_config`` (built on meta)."""
    with torch.device("meta"):
        model = build_model(model_config)
    roles: dict[str, Role] = {}
    units: dict[str, str] = {}
    linear = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    block_index = {id(m): i for i, m in enumerate(m for m in model.modules() if isinstance(m, Block))}
    for name, module in model.named_modules():
        for child, role in _linear_roles(module).items():
            prefix = f"{name}.{child}"
            roles[f"{prefix}.weight"] = role
            roles[f"{prefix}.bias"] = "colwise" if role == "colwise" else "rowwise_bias"
        if isinstance(module, ScoreBankChunk | ValueBankChunk):
            kind = "score" if isinstance(module, ScoreBankChunk) else "value"
            block = name.split(".blocks.")[1].split(".")[0]
            chunk = name.rsplit(".", 1)[1]
            for pname, _ in module.named_parameters():
                roles[f"{name}.{pname}"] = "bank"
                units[f"{name}.{pname}"] = f"chunk.{block}.{kind}.{chunk}"
        if isinstance(module, Block):
            for pname, _ in module.named_parameters():
                units.setdefault(f"{name}.{pname}", f"block.{block_index[id(module)]}")
    if vocab_parallel:
        roles["token_embedding.weight"] = "vocab"
        roles["head.weight"] = "vocab"
    params = tuple(
        ParamInfo(name, tuple(p.shape), roles.get(name, "replicated"), units.get(name, "root"), p.element_size(),
                  name in linear)
        for name, p in model.named_parameters())
    return Census(params)


def chunk_size(n: int, parts: int, index: int) -> int:
    """Rows ``index`` gets when ``torch.chunk`` splits ``n`` rows into ``parts``."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


@dataclass(frozen=True)
class Coordinates:
    """A rank's place in the ``(dp_replicate, dp_shard, dispp, tp)`` mesh."""

    dp_replicate: int
    dp_shard: int
    dispp: int
    tp: int

    @staticmethod
    def of(rank: int, layout: ParallelConfig) -> Coordinates:
        rest, tp = divmod(rank, layout.tp)
        rest, dispp = divmod(rest, layout.dispp)
        replicate, shard = divmod(rest, layout.dp_shard)
        return Coordinates(replicate, shard, dispp, tp)


def model_parallel_shape(p: ParamInfo, layout: ParallelConfig, at: Coordinates) -> tuple[int, ...]:
    """``p``'s local shape after head and displacement parallelism (before ZeRO-3)."""
    shape = list(p.shape)
    tp = layout.tp
    if tp > 1:
        dim = {"bank": 2, "colwise": 0, "rowwise": 1, "vocab": 0}.get(p.role)
        if dim is not None and dim < len(shape):
            shape[dim] = chunk_size(shape[dim], tp, at.tp)
    if p.role == "bank" and layout.dispp > 1:
        shape[0] = chunk_size(shape[0], layout.dispp, at.dispp)
    return tuple(shape)


def local_shape(p: ParamInfo, layout: ParallelConfig, at: Coordinates) -> tuple[int, ...]:
    """The shape of ``p``'s local tensor on the rank at ``at`` (FSDP2 splits dim 0 over ``dp_shard``)."""
    shape = list(model_parallel_shape(p, layout, at))
    if layout.engine == "fsdp":
        shape[0] = chunk_size(shape[0], layout.dp_shard, at.dp_shard)
    return tuple(shape)


def padded_model_parallel_numel(p: ParamInfo, layout: ParallelConfig) -> int:
    """Elements of the largest rank's tensor/displacement-parallel slice of ``p`` (FSDP2's unsharded unit size)."""
    shape = list(model_parallel_shape(p, layout, Coordinates(0, 0, 0, 0)))
    return math.prod(shape)


def padded_shard_numel(p: ParamInfo, layout: ParallelConfig) -> int:
    """Elements every rank allocates for ``p``'s ZeRO-3 shard (padded to the first, largest shard)."""
    if layout.engine == "fsdp":
        shape = list(model_parallel_shape(p, layout, Coordinates(0, 0, 0, 0)))
        shape[0] = -(-shape[0] // layout.dp_shard)
        return math.prod(shape)
    if layout.engine == "deepspeed":
        return -(-p.numel // (layout.dp_replicate * layout.dp_shard))
    return padded_model_parallel_numel(p, layout)
