"""Weights of the official Translution code (github.com/hehefan/Translution) ↔ this project.

A list of rules, each pairing official state-dict keys with ours and converting both
ways, is the single source of truth: import, export and the key and shape checks all
read it. ``docs/official_weights.md`` has the table.

Which official bank multiplies the query token depends on the official file *and its
version*, and the state dicts of a full (q, k, v) Translution cannot tell them apart
(``query_projection``):

* ``"to_k"`` — ``ViT/models/translution.py`` up to commit 0845c3e (2025-10-15, functions
  ``lution_vit_*``), ``ViT/models/alpha_translution.py`` and the ``CausalSharedParameter1/2``
  version of ``GPT/models/translution.py`` (``lution_*``): ``to_q`` multiplies the *key*
  token, ``to_k`` the *query* token. Their scores are a symmetric dot product, so official
  ``to_k`` becomes our query bank and ``to_q`` our key bank.
* ``"to_q"`` — ``ViT/models/translution.py`` from commit ef01c2b (2025-11-29) on (functions
  ``qkv_*``, ``kv_*``, …), the ``QKVTranslution`` version of ``GPT/models/translution.py``,
  ``lor_translution.py`` (ViT and GPT) and every RoPE or hybrid file: names match ours.

A model only the ``to_q`` files have (a subset of q, k, v, …) needs no choice; for the
others the importer refuses to guess. In both conventions the bank on the query token is
indexed by the query-side displacement; our query bank is stored in key-side order, so
its rows pass through ``layout.mirror``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from translution_dist.models import GPT, ViT, build_model
from translution_dist.models.attention import chunk_bounds, rope_frequencies
from translution_dist.models.config import ModelConfig

QueryProjection = Literal["to_k", "to_q"]
Convert = Callable[[list[Tensor]], list[Tensor]]


class OfficialWeightsError(ValueError):
    """Official weights that do not fit the model; the message lists every offending key."""


def _identity(tensors: list[Tensor]) -> list[Tensor]:
    return tensors


@dataclass(frozen=True)
class _Rule:
    """Official keys ↔ our keys, with the conversion each way."""

    official: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Convert = _identity
    to_official: Convert = _identity
    required: bool = True


def _same(official: str, ours: str) -> _Rule:
    return _Rule((official,), (ours,))


def _module(official: str, ours: str, names: tuple[str, ...] = ("weight", "bias")) -> list[_Rule]:
    return [_same(f"{official}.{name}", f"{ours}.{name}") for name in names]


def _fused(official: str, ours: tuple[str, ...]) -> _Rule:
    """One official ``Linear`` whose output rows are several of our projections."""
    def split(ws: list[Tensor]) -> list[Tensor]:
        return [part.clone() for part in ws[0].chunk(len(ours), dim=0)]

    return _Rule((official,), ours, split, lambda ws: [torch.cat(ws, dim=0)])


def _bank(official: str, ours: tuple[str, ...], official_rows: Tensor, bounds: list[tuple[int, int]]) -> _Rule:
    """An official ``unique_params`` bank ↔ our per-chunk banks.

    Our stored row ``r`` (``layout.storage_order``, then cut into chunks) is official row ``official_rows[r]``.
    """
    inverse = torch.empty_like(official_rows)
    inverse[official_rows] = torch.arange(len(official_rows))

    def to_ours(ws: list[Tensor]) -> list[Tensor]:
        stored = ws[0][official_rows.to(ws[0].device)]
        return [stored[start:stop].clone() for start, stop in bounds]  # no shared storage (safetensors)

    def to_official(ws: list[Tensor]) -> list[Tensor]:
        return [torch.cat(ws, dim=0)[inverse.to(ws[0].device)]]

    return _Rule((official,), ours, to_ours, to_official)


def _computed_buffer(official: str, make: Callable[[], Tensor]) -> _Rule:
    """An official constant buffer saved in its state dict: ignored (may be absent) on import, written on export."""
    return _Rule((official,), (), lambda ws: [], lambda ws: [make()], required=False)


def _causal_buffer(official: str, context_length: int) -> _Rule:
    """The official GPT's causal mask."""
    t = context_length
    return _computed_buffer(official, lambda: torch.tril(torch.ones(t, t)).view(1, 1, t, t))


def _rope_buffers(cfg: ModelConfig, theirs: str) -> list[_Rule]:
    """The official rotary caches ``cos_cached``/``sin_cached``: ``rotary_emb`` ``[1, 1, T, d]`` in a GPT,
    ``rope`` ``[1, H, W, d]`` (rows' and columns' angles, twice) in a ViT."""
    d = cfg.dims.dim_head
    if cfg.arch == "gpt":
        angles = torch.arange(cfg.context_length, dtype=torch.float32)[:, None] * rope_frequencies(d)
        name, shape = "rotary_emb", (1, 1, cfg.context_length, d)
    else:
        rows, cols = cfg.grid_hw
        freqs = rope_frequencies(d // 2)
        row_angles = torch.arange(rows, dtype=torch.float32)[:, None, None] * freqs
        col_angles = torch.arange(cols, dtype=torch.float32)[None, :, None] * freqs
        angles = torch.cat([row_angles.expand(rows, cols, -1), col_angles.expand(rows, cols, -1)], dim=-1)
        name, shape = "rope", (1, rows, cols, d)
    doubled = torch.cat([angles, angles], dim=-1)
    return [_computed_buffer(f"{theirs}{name}.{fn.__name__}_cached", lambda fn=fn: fn(doubled).reshape(shape))
            for fn in (torch.cos, torch.sin)]


def _official_side(side: str, query_projection: QueryProjection) -> str:
    """Official name letter of our ``side`` (``to_k`` on the query token swaps q and k)."""
    return {"q": "k", "k": "q", "v": "v"}[side] if query_projection == "to_k" else side


def _bank_rules(cfg: ModelConfig, theirs: str, ours: str, sides: str, suffix: str,
                query_projection: QueryProjection) -> list[_Rule]:
    layout = cfg.layout()
    bounds = chunk_bounds(layout.num_displacements, cfg.bank_chunks)
    rules = []
    for side in sides:
        rows = layout.storage_order
        if side == "q":
            rows = layout.mirror[rows]
        group = "value_banks" if side == "v" else "score_banks"
        keys = tuple(f"{ours}{group}.{c}.{side}.weight" for c in range(len(bounds)))
        name = f"{theirs}to_{_official_side(side, query_projection)}{suffix}.unique_params"
        rules.append(_bank(name, keys, rows, bounds))
    return rules


def _attention_rules(cfg: ModelConfig, theirs: str, ours: str, query_projection: QueryProjection,
                     relative: bool) -> list[_Rule]:
    """One block's attention; ``relative=False``: a hybrid's plain self-attention block (official ``Attention``)."""
    rules = _module(f"{theirs}norm", f"{ours}norm")
    d = cfg.dims
    if not (d.heads == 1 and d.dim_head == d.dim):  # else the official to_out is the identity, as ours
        rules += _module(f"{theirs}to_out.0", f"{ours}out_proj")
    if cfg.attention == "self_attention" or not relative:
        return rules + [_same(f"{theirs}to_qkv.weight", f"{ours}qkv_proj.weight")]
    if cfg.attention == "alpha":
        rules.append(_same(f"{theirs}to_qkv.weight", f"{ours}qkv_proj.weight"))
        downs = ("qk" if "q" in cfg.relative or "k" in cfg.relative else "") + ("v" if "v" in cfg.relative else "")
        for side in downs:
            name = f"to_{_official_side(side, query_projection)}1"
            rules.append(_same(f"{theirs}{name}.weight", f"{ours}{side}_down.weight"))
        if "v" in cfg.relative:
            rules.append(_same(f"{theirs}to_v3.weight", f"{ours}v_up.weight"))
        return rules + _bank_rules(cfg, theirs, ours, cfg.relative, "2", query_projection)
    plain = "".join(side for side in "qkv" if side not in cfg.relative)
    if plain:
        rules.append(_fused(f"{theirs}to_{plain}.weight", tuple(f"{ours}{side}_proj.weight" for side in plain)))
    return rules + _bank_rules(cfg, theirs, ours, cfg.relative, "", query_projection)


def _check_position(cfg: ModelConfig) -> None:
    """Refuse position settings no official model has."""
    position = cfg.resolved_position
    if position == "relative_bias":
        raise OfficialWeightsError("position=relative_bias: no official model has a relative-bias table; "
                                   "only learned, none, rope and learned+rope positions import")
    if cfg.rotary and cfg.rope_convention != "official":
        raise OfficialWeightsError(
            f"position={position} with rope_convention=project: the official rope files pair channel i with "
            "i+d/2 and place patches at (row, col); set rope_convention: official to import or export them")
    if cfg.attention == "self_attention" and cfg.rotary:
        wanted = "learned+rope" if cfg.arch == "vit" else "rope"  # ViT/ and GPT/models/rope_transformer.py
        if position != wanted:
            raise OfficialWeightsError(
                f"position={position}: the official {cfg.arch.upper()} rope_transformer.py has "
                f"position={wanted}; no official self-attention model has {position}")


AMBIGUOUS_QUERY_PROJECTION = (
    "query_projection='to_k' for ViT/models/translution.py up to commit 0845c3e (functions lution_vit_*), "
    "ViT/models/alpha_translution.py and the CausalSharedParameter1/2 GPT/models/translution.py (lution_*); "
    "query_projection='to_q' for ViT/models/translution.py from commit ef01c2b on (qkv_*, kv_*, ...), the "
    "QKVTranslution GPT/models/translution.py (qkv_*) and lor_translution.py (lor_*)")


def _only_in_to_q_files(cfg: ModelConfig) -> list[str]:
    """The settings of ``cfg`` that only the official files with ``query_projection='to_q'`` have."""
    found = []
    if cfg.attention != "self_attention" and cfg.relative != "qkv":
        found.append(f"relative={cfg.relative!r}")
    if cfg.attention != "self_attention" and cfg.relative_blocks is not None:
        found.append(f"relative_blocks={cfg.relative_blocks}")
    if cfg.rotary:
        found.append(f"position={cfg.resolved_position}")
    return found


def resolve_query_projection(cfg: ModelConfig, query_projection: QueryProjection | None) -> QueryProjection:
    """``query_projection`` checked against ``cfg``, or inferred where only one official convention has ``cfg``.

    A full (q, k, v) Translution or α-Translution exists in both conventions and loads without
    error either way, into different functions: there the caller must say which file the weights
    come from.
    """
    if query_projection not in (None, "to_k", "to_q"):
        raise ValueError(f"query_projection must be 'to_k' or 'to_q', got {query_projection!r}")
    if cfg.attention == "self_attention":
        return query_projection or "to_q"  # no banks: nothing depends on it
    only_to_q = _only_in_to_q_files(cfg)
    if query_projection == "to_k" and only_to_q:
        raise OfficialWeightsError(
            f"{', '.join(only_to_q)}: only official files with query_projection='to_q' have this model "
            "(the to_k files have Translution on all of q, k, v in every block); use query_projection='to_q'")
    if query_projection is None:
        if only_to_q:
            return "to_q"
        raise OfficialWeightsError(
            "query_projection is required for this model: both official conventions have it and load "
            f"without error into different functions; {AMBIGUOUS_QUERY_PROJECTION}")
    return query_projection


def official_rules(cfg: ModelConfig, query_projection: QueryProjection | None) -> list[_Rule]:
    """Every official ↔ ours key pairing of the model ``cfg`` describes (see :func:`resolve_query_projection`)."""
    query_projection = resolve_query_projection(cfg, query_projection)
    _check_position(cfg)
    root = "transformer" if cfg.attention == "self_attention" else "translution"
    rules: list[_Rule] = []
    for i in range(cfg.dims.depth):
        theirs, ours = f"{root}.layers.{i}.", f"encoder.blocks.{i}."
        relative = cfg.attention == "self_attention" or i < cfg.num_relative_blocks
        rules += _attention_rules(cfg, f"{theirs}0.", f"{ours}attn.", query_projection, relative)
        rules += _module(f"{theirs}1.net.0", f"{ours}ff.norm")
        rules += _module(f"{theirs}1.net.1", f"{ours}ff.up_proj")
        rules += _module(f"{theirs}1.net.4", f"{ours}ff.down_proj")
        if cfg.arch == "gpt" and relative:  # a hybrid's official Attention blocks have no causal mask
            rules.append(_causal_buffer(f"{theirs}0.causal", cfg.context_length))
        if cfg.rotary and relative:  # nor a rotary embedding
            rules += _rope_buffers(cfg, f"{theirs}0.")
    rules += _module(f"{root}.norm", "encoder.norm")
    if cfg.arch == "vit":
        rules += _module("to_patch_embedding.1", "patch_embed.norm_in")
        rules += _module("to_patch_embedding.2", "patch_embed.proj")
        rules += _module("to_patch_embedding.3", "patch_embed.norm_out")
        rules += [_same("cls_token", "cls_token")] + _module("mlp_head", "head")
        if cfg.learned_position:
            rules.append(_same("pos_embedding", "pos_embedding"))
    else:
        rules += [_same("wte.weight", "token_embedding.weight"), _same("output_head.weight", "head.weight")]
        rules += _module("norm", "final_norm")
        if cfg.learned_position:
            rules.append(_same("wpe.weight", "pos_embedding.weight"))
    return rules


def _convert(source: Mapping[str, Tensor], rules: list[_Rule], official_to_ours: bool) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for rule in rules:
        keys_in, keys_out = (rule.official, rule.ours) if official_to_ours else (rule.ours, rule.official)
        convert = rule.to_ours if official_to_ours else rule.to_official
        out.update(zip(keys_out, convert([source.get(key) for key in keys_in])))
    return out


def _meta_state(cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict for ``cfg`` on the meta device: every key and shape, no memory."""
    with torch.device("meta"):
        return build_model(cfg).state_dict()


def _check(given: Mapping[str, Tensor], expected: Mapping[str, torch.Size], optional: set[str], what: str) -> None:
    missing = sorted(set(expected) - set(given) - optional)
    unexpected = sorted(set(given) - set(expected))
    mismatched = [f"{key}: expected {list(shape)}, got {list(given[key].shape)}"
                  for key, shape in expected.items() if key in given and given[key].shape != shape]
    problems = [f"{label} ({len(items)}):\n    " + "\n    ".join(items)
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", mismatched)) if items]
    if problems:
        raise OfficialWeightsError(f"{what} do not fit this model config:\n  " + "\n  ".join(problems))


def from_official(official: Mapping[str, Tensor], cfg: ModelConfig, *,
                  query_projection: QueryProjection | None = None) -> dict[str, Tensor]:
    """Our state dict for ``cfg`` from an official one (keys without a ``module.`` prefix)."""
    rules = official_rules(cfg, query_projection)
    with torch.device("meta"):  # the exported causal masks too: only shapes are needed
        expected = _convert(_meta_state(cfg), rules, official_to_ours=False)
    optional = {key for rule in rules if not rule.required for key in rule.official}
    _check(official, {key: value.shape for key, value in expected.items()}, optional, "official weights")
    return _convert(official, rules, official_to_ours=True)


def to_official(state: Mapping[str, Tensor], cfg: ModelConfig, *,
                query_projection: QueryProjection | None = None) -> dict[str, Tensor]:
    """The official state dict (as the official ``model.state_dict()``) of our weights for ``cfg``."""
    rules = official_rules(cfg, query_projection)
    _check(state, {key: value.shape for key, value in _meta_state(cfg).items()}, set(), "weights")
    return _convert(state, rules, official_to_ours=False)


def load_official(model: ViT | GPT, official: Mapping[str, Tensor], *,
                  query_projection: QueryProjection | None = None) -> None:
    """Load official weights into a model made by ``build_model(cfg)`` (strict: every weight is set)."""
    model.load_state_dict(from_official(official, model.config, query_projection=query_projection), strict=True)


def read_official_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The model weights in a file saved by the official scripts.

    Accepts their training checkpoints (a dict whose ``state_dict`` holds the weights) and
    bare state dicts, and drops the ``module.`` prefix DataParallel and DDP add.
    """
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded)
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)
