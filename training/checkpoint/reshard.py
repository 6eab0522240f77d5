"""Offline change of ``model.bank_chunks`` in a checkpoint: the one layout change the loader cannot make.

DCP stores every tensor with its global shape, so a run resumes under any dp/tp/dispp
degrees and world size by itself. The bank chunking instead changes parameter *names and
shapes*: each bank is stored as chunk parameters ``<family>.{c}.{side}.weight`` holding
consecutive rows ``[start_c, stop_c)`` of the bank in ``layout.storage_order``. Resharding
concatenates a bank's chunks (and, the same way, the optimizer moments of those chunks),
cuts the rows at the new chunk bounds, renames the optimizer's parameter lists, and writes
a complete checkpoint through the same atomic protocol as the trainer
(:class:`~training.checkpoint.store.CheckpointManager`).

The output is a new run directory ``DIR`` holding ``config.yaml`` (the source run's
resolved config with ``run.output_dir``/``run.name`` pointing at ``DIR``, the new
``bank_chunks`` and any ``parallel.*`` overrides) and ``checkpoints/step_XXXXXXXX/``. The
rank files (RNG, data position) are copied and ``world_size`` stays the source's, so a run
at that world size continues exactly; at another world size the trainer reshards as usual.
The whole checkpoint (model and optimizer) is held in host memory while converting.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from pydantic import ValidationError
from torch import Tensor

from training.checkpoint.locate import (
    BANK_PATTERN,
    CheckpointToolError,
    Located,
    dcp_metadata,
    load_entries,
    model_config,
    single_process,
)
from training.checkpoint.store import CheckpointError, CheckpointManager, step_dir_name
from training.config import Config, apply_override, dump_config, format_validation_error
from translution_dist.models import ModelConfig, build_model
from translution_dist.models.attention import chunk_bounds

V = TypeVar("V")
Family = tuple[str, str]  # ("encoder.blocks.0.attn.score_banks", "q")


@dataclass(frozen=True)
class ReshardResult:
    run_dir: Path
    checkpoint: Path
    bank_chunks: tuple[int, int]  # (before, after)
    banks: int  # bank parameters whose rows were regrouped


def new_config(located: Located, out: Path, overrides: list[str]) -> Config:
    """The source run's config with ``overrides`` applied and the run pointed at ``out``."""
    for override in overrides:  # the chunking, and the parallel section recorded for the new run
        key = override.partition("=")[0]
        if key != "model.bank_chunks" and not key.startswith("parallel."):
            raise CheckpointToolError(
                f"override '{override}': reshard changes only model.bank_chunks and parallel.* (other model "
                "fields change parameter shapes; train/optim/... settings belong on the resumed run's command line)")
    raw = json.loads(json.dumps(located.meta.get("config") or {}))
    if not raw:
        raise CheckpointToolError(f"{located.path}/meta.json records no config")
    try:
        for override in overrides:
            apply_override(raw, override)
        raw.setdefault("run", {}).update(output_dir=str(out.resolve().parent), name=out.name)
        cfg = Config.model_validate(raw)
        cfg.parallel.check_model(cfg.model)
    except ValidationError as err:
        raise CheckpointToolError(format_validation_error(err)) from err
    except ValueError as err:  # ConfigError of an override, check_model's limits
        raise CheckpointToolError(str(err)) from err
    return cfg


def _nest(flat: dict[str, Any], paths: dict[str, tuple]) -> dict[str, Any]:
    """The nested state (``{"model": …, "optim": {"state": …, "param_groups": [...]}}``) DCP flattened."""
    root: dict[Any, Any] = {}
    for key, value in flat.items():
        *parents, leaf = paths[key]
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def lists(node: Any) -> Any:  # integer path parts were list indices
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        if node and all(isinstance(k, int) for k in node):
            return [node[i] for i in range(len(node))]
        return node

    return lists(root)


def read_state(located: Located) -> dict[str, Any]:
    """The checkpoint's whole state, nested as the trainer saved it, in plain CPU tensors."""
    metadata = dcp_metadata(located)
    if not metadata.planner_data:
        raise CheckpointToolError(f"{located.dcp_dir}: the DCP index records no state-dict structure")
    return _nest(load_entries(located, metadata, list(metadata.state_dict_metadata)), metadata.planner_data)


def _families(names: list[str]) -> dict[Family, list[str]]:
    """Each bank's chunk parameter names, in chunk order."""
    chunks: dict[Family, dict[int, str]] = defaultdict(dict)
    for name in names:
        match = BANK_PATTERN.match(name)
        if match:
            chunks[(match["family"], match["side"])][int(match["chunk"])] = name
    families = {}
    for family, by_index in chunks.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise CheckpointToolError(f"{family[0]}.*.{family[1]}: chunks {sorted(by_index)} are not 0..n-1")
        families[family] = [by_index[c] for c in range(len(by_index))]
    return families


def _chunk_name(family: Family, chunk: int) -> str:
    return f"{family[0]}.{chunk}.{family[1]}.weight"


def _split_rows(parts: list[Tensor], bounds: list[tuple[int, int]], what: str) -> list[Tensor]:
    whole = torch.cat(parts, dim=0)
    if whole.shape[0] != bounds[-1][1]:
        raise CheckpointToolError(f"{what}: {whole.shape[0]} rows, the model has K={bounds[-1][1]}")
    return [whole[start:stop] for start, stop in bounds]


def _same_scalar(parts: list[Tensor], count: int, what: str) -> list[Tensor]:
    if any(not torch.equal(p, parts[0]) for p in parts):
        raise CheckpointToolError(f"{what}: differs between chunks ({[p.item() for p in parts]}); cannot merge")
    return [parts[0].clone() for _ in range(count)]


def _optimizer_state(parts: list[dict[str, Tensor]], bounds: list[tuple[int, int]], what: str) -> list[dict]:
    """A bank's per-chunk optimizer states regrouped: row-wise moments split, scalars (``step``) shared."""
    if any(p.keys() != parts[0].keys() for p in parts):
        raise CheckpointToolError(f"{what}: chunks hold different optimizer states")
    new: list[dict[str, Tensor]] = [{} for _ in bounds]
    for stat in parts[0]:
        values = [p[stat] for p in parts]
        if all(v.dim() == 0 for v in values):
            regrouped = _same_scalar(values, len(bounds), f"{what} {stat}")
        else:
            regrouped = _split_rows(values, bounds, f"{what} {stat}")
        for state, value in zip(new, regrouped, strict=True):
            state[stat] = value
    return new


def _regroup(entries: dict[str, V], families: dict[Family, list[str]], bounds: list[tuple[int, int]],
             split: Callable[[list[V], list[tuple[int, int]], str], list[V]]) -> dict[str, V]:
    """``entries`` with every bank's chunks replaced by the new chunks, in place of its first chunk."""
    out: dict[str, V] = {}
    first = {names[0]: family for family, names in families.items()}
    chunk_names = {name for names in families.values() for name in names}
    for name, value in entries.items():  # (an optimizer holds no state for a bank it never stepped)
        if name in first:
            family = first[name]
            parts = [entries[n] for n in families[family] if n in entries]
            if len(parts) != len(families[family]):
                raise CheckpointToolError(f"{family[0]}.*.{family[1]}: state for some chunks only")
            for chunk, part in enumerate(split(parts, bounds, f"{family[0]}.*.{family[1]}")):
                out[_chunk_name(family, chunk)] = part
        elif name not in chunk_names:
            out[name] = value
    return out


def _param_list(params: list[str], families: dict[Family, list[str]], new_chunks: int) -> list[str]:
    """An optimizer param group's names with each bank module list's chunks renumbered."""
    groups: dict[str, list[Family]] = defaultdict(list)  # "….score_banks" → its sides, in model order
    for family in families:
        groups[family[0]].append(family)
    out, done = [], set()
    for name in params:
        match = BANK_PATTERN.match(name)
        if not match:
            out.append(name)
        elif match["family"] not in done:
            done.add(match["family"])
            out += [_chunk_name(f, c) for c in range(new_chunks) for f in groups[match["family"]]]
    return out


def _shapes(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shapes(build_model(cfg).state_dict())


def regroup_state(state: dict[str, Any], old_cfg: ModelConfig, new_cfg: ModelConfig) -> int:
    """Rewrite the nested checkpoint ``state`` in place from ``old_cfg``'s chunking to ``new_cfg``'s.

    Returns the number of bank parameters regrouped.
    """
    model = state["model"]
    if _shapes(model) != _expected_shapes(old_cfg):
        raise CheckpointToolError("the checkpoint's model tensors do not match the model config in its meta.json")
    families = _families(list(model))
    bounds = chunk_bounds(new_cfg.layout().num_displacements, new_cfg.bank_chunks) if families else []
    state["model"] = _regroup(model, families, bounds, _split_rows)
    optim = state.get("optim")
    if optim:
        optim["state"] = _regroup(optim.get("state", {}), families, bounds, _optimizer_state)
        for group in optim.get("param_groups", []):
            group["params"] = _param_list(group["params"], families, new_cfg.bank_chunks)
    if _shapes(state["model"]) != _expected_shapes(new_cfg):
        raise AssertionError("regrouped model does not match the new config")  # a bug here, not bad input
    return sum(len(names) for names in families.values())


def _write(located: Located, cfg: Config, state: dict[str, Any], run_dir: Path) -> None:
    """Write ``run_dir/config.yaml`` and the checkpoint (the trainer's atomic protocol)."""
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    world_size = int(located.meta["world_size"])
    manager = CheckpointManager(run_dir / "checkpoints", keep=1, rank=0, world_size=world_size)

    def save_state(tmp: Path) -> None:
        with single_process():
            dcp.save(state, checkpoint_id=str(tmp / "dcp"), no_dist=True)
        for rank in range(1, world_size):
            shutil.copy2(located.path / f"rank_{rank}.pt", tmp / f"rank_{rank}.pt")

    rank0 = torch.load(located.path / "rank_0.pt", weights_only=False)["rank_state"]
    meta = {key: value for key, value in located.meta.items() if key not in ("step", "world_size")}
    # meta.json's layout is the one the shards were written at (the source's), now with the new chunking.
    written_at = located.meta["layout"].rsplit(",bank_chunks=", 1)[0] + f",bank_chunks={cfg.model.bank_chunks}"
    meta.update(config=json.loads(json.dumps(cfg.model_dump(mode="json"))), layout=written_at,
                resharded_from={"path": str(located.path.resolve()), "layout": located.meta.get("layout")})
    manager.save(located.step, save_state, rank0, meta)


def check_target(out: Path) -> None:
    """Refuse an ``--out`` that cannot become the new run directory, before any checkpoint is read."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointToolError(f"--out {out} already exists; give a new run directory")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise CheckpointToolError(f"cannot create {out}: {out.parent} is not a writable directory")


def reshard(located: Located, out: Path, overrides: list[str]) -> ReshardResult:
    """Write the checkpoint ``located`` with ``overrides`` applied as the new run directory ``out``.

    ``out`` must not exist yet; it appears complete or not at all.
    """
    check_target(out)
    cfg = new_config(located, out, overrides)
    old_cfg = model_config(located)
    tmp = out.parent / f".{out.name}.reshard-{os.getpid()}.tmp"
    try:
        tmp.mkdir()
    except OSError as err:
        raise CheckpointToolError(f"cannot create the output next to {out}: {err.strerror or err}") from err
    try:
        state = read_state(located)
        banks = regroup_state(state, old_cfg, cfg.model)
        _write(located, cfg, state, tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except (OSError, CheckpointError) as err:
        raise CheckpointToolError(f"writing {out} failed: {err}; nothing was written") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ReshardResult(out, out / "checkpoints" / step_dir_name(located.step),
                         (old_cfg.bank_chunks, cfg.model.bank_chunks), banks)
