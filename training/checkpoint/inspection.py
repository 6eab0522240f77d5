"""What a checkpoint holds, from its DCP index alone (no tensor is loaded).

``describe`` builds a JSON-able report: step, world size, layout, the model it was written
for, every tensor entry with its global shape, dtype and size, and totals for the model and
the optimizer, each split into displacement banks and the rest (banks dominate Translution
models, so that split is what sizing a run needs). ``format_report`` renders it as text.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from training.checkpoint.locate import (
    BANK_PATTERN,
    MODEL_PREFIX,
    OPTIM_STATE_PREFIX,
    CheckpointToolError,
    Located,
    dcp_metadata,
    model_config,
)
from translution_dist.models.config import BANK_ATTENTIONS

SECTIONS = ("model", "optim")


def _section_and_parameter(key: str) -> tuple[str, str | None]:
    """``("model"|"optim"|"other", the parameter the entry belongs to)``."""
    if key.startswith(MODEL_PREFIX):
        return "model", key.removeprefix(MODEL_PREFIX)
    if key.startswith(OPTIM_STATE_PREFIX):
        return "optim", key.removeprefix(OPTIM_STATE_PREFIX).rpartition(".")[0]
    return "other", None


def _model_summary(located: Located) -> dict[str, Any]:
    try:
        cfg = model_config(located)
    except CheckpointToolError as err:
        return {"error": str(err)}
    dims = cfg.dims
    summary = {"arch": cfg.arch, "attention": cfg.attention, **dims._asdict(), "bank_chunks": cfg.bank_chunks}
    if cfg.attention in BANK_ATTENTIONS:
        summary["displacements"] = cfg.layout().num_displacements
    return summary


def _totals(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    def add(rows: list[dict[str, Any]]) -> dict[str, int]:
        return {"tensors": len(rows), "elements": sum(r["elements"] for r in rows),
                "bytes": sum(r["bytes"] for r in rows)}

    totals = {}
    for section in SECTIONS:
        rows = [t for t in tensors if t["section"] == section]
        totals[section] = {**add(rows), "banks": add([r for r in rows if r["bank"]]),
                           "rest": add([r for r in rows if not r["bank"]])}
    return totals


def describe(located: Located) -> dict[str, Any]:
    """The report of one located checkpoint (see the module docstring)."""
    metadata = dcp_metadata(located)
    tensors, objects = [], []
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            objects.append(key)
            continue
        section, parameter = _section_and_parameter(key)
        elements = md.size.numel()
        tensors.append({"name": key, "section": section, "shape": list(md.size),
                        "dtype": str(md.properties.dtype).removeprefix("torch."), "elements": elements,
                        "bytes": elements * md.properties.dtype.itemsize,
                        "bank": bool(parameter and BANK_PATTERN.match(parameter))})
    files = [p for p in located.path.rglob("*") if p.is_file()]
    return {
        "path": str(located.path),
        "chosen_from": str(located.chosen_from) if located.chosen_from else None,
        "skipped": [{"checkpoint": name, "reason": why} for name, why in located.skipped],
        "step": located.step,
        "world_size": located.meta.get("world_size"),
        "layout": located.meta.get("layout"),
        "checksums": "verified" if located.verified else "not checked",
        "model": _model_summary(located),
        "totals": _totals(tensors),
        "tensors": tensors,
        "other_entries": objects,
        "files": len(files),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _total_line(label: str, total: dict[str, int]) -> str:
    return (f"{label:<18}{total['tensors']:>6} tensors {total['elements']:>16,} elements "
            f"{human_bytes(total['bytes']):>11}")


def format_report(report: dict[str, Any]) -> str:
    """The report as text: header, totals, then every tensor grouped by section."""
    lines = [f"checkpoint {report['path']}"]
    if report["chosen_from"]:
        lines.append(f"  (the newest good checkpoint in {report['chosen_from']})")
    lines += [f"  skipped {s['checkpoint']}: {s['reason']}" for s in report["skipped"]]
    lines.append(f"step {report['step']}  world size {report['world_size']}  layout {report['layout']}")
    lines.append(f"checksums: {report['checksums']} ({report['files']} files, {human_bytes(report['bytes_on_disk'])} "
                 "on disk)")
    model = report["model"]
    if "error" in model:
        lines.append(f"model: {model['error']}")
    else:
        banks = f", K={model['displacements']} displacements in {model['bank_chunks']} bank chunk(s)" \
            if "displacements" in model else ""
        lines.append(f"model: {model['arch']} {model['attention']}, dim {model['dim']}, depth {model['depth']}, "
                     f"heads {model['heads']}x{model['dim_head']}, mlp {model['mlp_dim']}{banks}")
    lines.append("")
    for section, title in (("model", "model"), ("optim", "optimizer state")):
        total = report["totals"][section]
        lines += [_total_line(title, total), _total_line("  banks", total["banks"]),
                  _total_line("  rest", total["rest"])]
    for section, title in (("model", "model tensors"), ("optim", "optimizer tensors"), ("other", "other tensors")):
        rows = [t for t in report["tensors"] if t["section"] == section]
        if not rows:
            continue
        width = max(len(r["name"]) for r in rows)
        lines += ["", f"{title} (global shapes):"]
        for r in rows:
            shape = "[" + ", ".join(map(str, r["shape"])) + "]"
            lines.append(f"  {r['name']:<{width}}  {shape:<18} {r['dtype']:<9} {human_bytes(r['bytes']):>11}")
    if report["other_entries"]:
        lines += ["", f"non-tensor entries ({len(report['other_entries'])}): " + ", ".join(report["other_entries"])]
    return "\n".join(lines)
