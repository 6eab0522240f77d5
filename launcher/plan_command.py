"""``translution plan CONFIG [key=value …] [--nodes N --gpus-per-node G --gpu-mem 80GiB …]``: which layouts fit.

Prints every parallel layout the cluster can run with its per-rank GPU peak, host memory
and NVMe per node, inter-node traffic and estimated data-movement seconds per step, why each
one that does not fit fails, and the layout the planner picks (with the overrides that
select it). The cluster defaults to the config's ``cluster`` section and, planning for the
machine (or job) it runs in, to what ``launch`` detects there: processes per node, GPU memory,
host memory. ``--verify-shards`` also builds the full model on the meta device and shards it
with the real code on a fake process group, for the layout a launch would use (the config's
when it fits, else the planner's choice), and checks every listed rank's parameter shards
against the plan. Exit status 2 when nothing fits, 1 when the shards disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from launcher.launch_command import intermixed, positive_int
from launcher.memory_model import MemoryEstimate, fmt_bytes
from launcher.plan import (
    DEFAULT_HEADROOM,
    Candidate,
    Cluster,
    Plan,
    describe_layout,
    global_batch,
    hints,
    layout_overrides,
    plan,
)
from launcher.topology import detect
from training.config import Config, load_config

TABLE_ROWS = 12


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _ranks(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ranks such as 0,7,63, got {text!r}") from err


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = intermixed(subparsers.add_parser(
        "plan", help="per-rank memory of every parallel layout, and the one to use",
        description=__doc__.splitlines()[0]))
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.bank_chunks=8")
    parser.add_argument("--nodes", type=positive_int, metavar="N", help="nodes (default: cluster.nodes)")
    parser.add_argument("--gpus-per-node", type=positive_int, metavar="G", dest="procs",
                        help="GPUs, i.e. processes, per node (default: as launch: the scheduler's, "
                             "cluster.procs_per_node, the GPUs here, else 1)")
    parser.add_argument("--gpu-mem", metavar="SIZE", help="memory per GPU, e.g. 80GiB (default: cluster.gpu_memory, "
                                                           "else the GPUs here; none: the processes run on CPUs)")
    parser.add_argument("--cpu-mem", metavar="SIZE", help="host memory per node (default: cluster.cpu_memory, "
                                                          "else this machine's)")
    parser.add_argument("--nvme", metavar="SIZE", help="NVMe per node (default: cluster.nvme)")
    parser.add_argument("--headroom", type=_fraction, default=DEFAULT_HEADROOM, metavar="F",
                        help=f"fraction of GPU and host memory kept free (default {DEFAULT_HEADROOM})")
    parser.add_argument("--all", action="store_true", help="list every candidate, not the best few")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--verify-shards", type=_ranks, metavar="RANKS", nargs="?", const=[],
                        help="shard the full model with the real code on a fake process group for the layout a "
                             "launch would use and check these ranks (default: first, last and one per node) "
                             "against the plan")
    parser.add_argument("--calibrate", metavar="OUT.yaml", type=Path,
                        help="measure this machine instead of planning (matmul rate, the config's attention and "
                             "feed-forward at its micro-batch, AdamW, host copies, gloo bandwidth and latency) with "
                             "--procs concurrent processes, and write a cluster file for cluster=OUT.yaml")
    parser.add_argument("--procs", type=positive_int, default=2, metavar="N",
                        help="processes measured at once by --calibrate (default 2)")
    parser.add_argument("--budget", type=float, default=2.0, metavar="S",
                        help="seconds per timed figure of --calibrate (default 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.calibrate is not None:
        return _calibrate(cfg, args.calibrate, args.procs, args.budget)
    cluster = Cluster.of(cfg, args.nodes, args.procs, args.gpu_mem, args.cpu_mem, args.nvme, args.headroom, detect())
    result = plan(cfg, cluster)
    advice = [] if result.choice else hints(cfg, cluster)
    verification = None
    used = result.config_layout if result.config_layout is not None and result.config_layout.fits else result.choice
    if args.verify_shards is not None and used is not None:
        from launcher.shard_dry_run import default_ranks, verify

        ranks = args.verify_shards or default_ranks(cluster.world_size, cluster.procs_per_node)
        bad = [rank for rank in ranks if not 0 <= rank < cluster.world_size]
        if bad:
            raise UsageError(f"--verify-shards {bad}: ranks go from 0 to {cluster.world_size - 1}")
        verification = verify(cfg.model, used.layout, ranks, used.estimate)
    if args.json:
        print(json.dumps(to_json(cfg, result, advice, verification), indent=2))
    else:
        print(render(cfg, result, advice, args.all))
        if verification is not None:
            print(verification.describe())
    if verification is not None and not verification.ok:
        return 1
    return 0 if result.choice else 2


def _calibrate(cfg: Config, out: Path, procs: int, budget_s: float) -> int:
    from launcher import calibrate

    if budget_s <= 0:
        raise UsageError(f"--budget {budget_s}: give a positive number of seconds")
    figures = calibrate.measure(cfg.model, cfg.train.micro_batch_size, procs, budget_s)
    calibrate.write(out, calibrate.cluster_yaml(figures, procs, cfg.train.micro_batch_size))
    print(calibrate.describe(figures, procs))
    print(f"wrote {out}; plan with it: translution plan CONFIG cluster={out}")
    return 0


def _row(index: int | str, c: Candidate, gpus: bool) -> str:
    gpu = fmt_bytes(c.gpu_bytes) if gpus else "-"
    layout = describe_layout(c.layout, offload=False)
    t = c.time
    return (f"{index!s:>3}  {layout:<50} {c.offload:<14} {gpu:>10} {fmt_bytes(c.host_per_node):>10} "
            f"{t.compute_s:>8.3g} {t.exposed_comm_s:>8.3g} {t.offload_s:>8.3g} {t.optimizer_s:>8.3g} "
            f"{t.step_s:>8.3g} {t.tokens_per_s:>9.3g} {t.mfu:>6.1%}  {'fits' if c.fits else 'no'}")


def render(cfg: Config, result: Plan, advice: list[str], show_all: bool = False) -> str:
    """The human-readable plan."""
    cluster = result.cluster
    est = (result.choice or result.config_layout or result.candidates[0]).estimate
    lines = [
        f"model:    {cfg.model.arch} {cfg.model.attention}, {est.parameters:,} parameters "
        f"({_fp32_size(est.parameters)} in fp32), bank_chunks={cfg.model.bank_chunks}",
        f"cluster:  {cluster.describe()}",
        f"hardware: {cluster.describe_hardware()}",
        f"run:      micro-batch {cfg.train.micro_batch_size} × grad_accum {cfg.train.grad_accum}, "
        f"train.precision={cfg.train.precision}, parallel.mixed_precision={cfg.parallel.mixed_precision}",
        "",
        f"{'#':>3}  {'layout':<50} {'offload':<14} {'GPU peak':>10} {'host/node':>10} {'compute':>8} "
        f"{'comm':>8} {'offload':>8} {'optim':>8} {'step s':>8} {'tokens/s':>9} {'MFU':>6}  verdict",
    ]
    fitting = [c for c in result.candidates if c.fits]
    failing = [c for c in result.candidates if not c.fits]
    shown_fit = fitting if show_all else fitting[:TABLE_ROWS]
    shown_fail = failing if show_all else failing[:max(3, TABLE_ROWS - len(shown_fit))]
    gpus = bool(cluster.gpu_memory)
    lines += [_row(i + 1, c, gpus) for i, c in enumerate(shown_fit)]
    if len(shown_fit) < len(fitting):
        lines.append(f"     … {len(fitting) - len(shown_fit)} more that fit (--all lists them)")
    for c in shown_fail:
        lines.append(_row("-", c, gpus))
        lines += [f"       {problem}" for problem in c.problems]
    if len(shown_fail) < len(failing):
        lines.append(f"     … {len(failing) - len(shown_fail)} more that do not fit")
    lines.append("")
    if result.config_layout is not None:
        own = result.config_layout
        state = "fits" if own.fits else "does not fit: " + "; ".join(own.problems)
        lines.append(f"config's layout ({describe_layout(own.layout)}): {state}")
    else:
        lines.append(f"config's layout: {result.config_error}")
    choice = result.choice
    if choice is None:
        lines.append("no layout fits" + (f"; would fit with {' or '.join(advice)}" if advice else ""))
        return "\n".join(lines)
    lines += [f"chosen:   {describe_layout(choice.layout)} (global batch "
              f"{global_batch(cfg, choice.layout)})", _time_line(choice), *_breakdown(choice.estimate, gpus),
              f"overrides: {' '.join(layout_overrides(choice.layout))}"]
    return "\n".join(lines)


def _time_line(c: Candidate) -> str:
    t = c.time
    return (f"  step {t.step_s:.3g} s = compute {t.compute_s:.3g} + exposed communication {t.exposed_comm_s:.3g} "
            f"(tp/dispp {t.critical_comm_s:.3g}; ZeRO-3 {t.hidden_comm_s:.3g} before overlap) + offload "
            f"{t.offload_s:.3g} + optimizer {t.optimizer_s:.3g}; {t.tokens_per_s:,.0f} tokens/s, MFU {t.mfu:.1%} "
            f"({t.step_s / t.compute_s:.2f}× compute); per step {fmt_bytes(c.cost.inter_node)} across nodes, "
            f"{fmt_bytes(c.cost.intra_node)} inside, {fmt_bytes(c.cost.pcie)} PCIe, {fmt_bytes(c.cost.nvme)} NVMe")


def _fp32_size(parameters: int) -> str:
    nbytes = 4 * parameters
    return fmt_bytes(nbytes) + (f" = {nbytes / 1e12:.2f} TB" if nbytes >= 1e11 else "")


def _breakdown(est: MemoryEstimate, gpus: bool) -> list[str]:
    out = []
    device, host = ("per GPU", "host per rank") if gpus else ("per process", "more per process")
    for where, label in (("device", device), ("host", host), ("nvme", "NVMe per rank")):
        terms = est.breakdown(where)
        if terms:
            phase = est.peak_phase(where).name
            out.append(f"  {label} {fmt_bytes(est.peak(where))} at {phase}: "
                       + ", ".join(f"{t.name} {fmt_bytes(t.bytes)}" for t in terms))
    a = est.activations
    if a.mode == "none":
        out.append(f"  activations: {fmt_bytes(a.per_block)} per block × {a.blocks} + {fmt_bytes(a.root)} root "
                   f"= {fmt_bytes(a.total)} ({fmt_bytes(a.total_recompute)} with per-block recomputation)")
    else:
        out.append(f"  activations ({a.mode} recomputation): {fmt_bytes(a.kept_per_block)} per block × {a.blocks} "
                   f"+ {fmt_bytes(a.recomputed)} recomputed + {fmt_bytes(a.root)} root = {fmt_bytes(a.total)} "
                   f"({fmt_bytes(a.per_block * a.blocks + a.root)} without)")
    return out


def _estimate_json(est: MemoryEstimate) -> dict[str, Any]:
    return {
        "parameters": est.parameters,
        "param_bytes_per_rank": est.param_bytes_per_rank,
        "peak_bytes": {where: est.peak(where) for where in ("device", "host", "nvme")},
        "persistent": [{"name": t.name, "bytes": t.bytes, "where": t.where} for t in est.persistent],
        "phases": {p.name: [{"name": t.name, "bytes": t.bytes, "where": t.where} for t in p.terms]
                   for p in est.phases},
        "activations": {"per_block": est.activations.per_block, "blocks": est.activations.blocks,
                        "root": est.activations.root, "total": est.activations.total,
                        "total_with_recompute": est.activations.total_recompute,
                        "activation_checkpoint": est.activations.mode},
    }


def _candidate_json(cfg: Config, c: Candidate) -> dict[str, Any]:
    return {
        "layout": c.layout.model_dump(mode="json"),
        "fits": c.fits,
        "problems": list(c.problems),
        "offload": c.offload,
        "gpu_peak_bytes": c.gpu_bytes,
        "host_per_node_bytes": c.host_per_node,
        "nvme_per_node_bytes": c.nvme_per_node,
        "step_cost": {"inter_node_bytes": c.cost.inter_node, "intra_node_bytes": c.cost.intra_node,
                      "pcie_bytes": c.cost.pcie, "nvme_bytes": c.cost.nvme, "cpu_updates": c.cost.cpu_updates,
                      "seconds": c.cost.seconds},
        "compute_s": c.time.compute_s,
        "step_s": c.time.step_s,
        "mfu": c.time.mfu,
        "tokens_per_s": c.time.tokens_per_s,
        "step_time": {"compute_s": c.time.compute_s, "exposed_comm_s": c.time.exposed_comm_s,
                      "critical_comm_s": c.time.critical_comm_s, "hidden_comm_s": c.time.hidden_comm_s,
                      "offload_s": c.time.offload_s, "optimizer_s": c.time.optimizer_s, "step_s": c.time.step_s,
                      "tokens_per_step": c.time.tokens, "model_flops_per_step": c.time.model_flops},
        "global_batch": global_batch(cfg, c.layout),
        "overrides": layout_overrides(c.layout),
        "per_rank": _estimate_json(c.estimate),
    }


def to_json(cfg: Config, result: Plan, advice: list[str], verification: Any = None) -> dict[str, Any]:
    c = result.cluster
    return {
        "cluster": {"nodes": c.nodes, "procs_per_node": c.procs_per_node, "world_size": c.world_size,
                    "gpu_memory": c.gpu_memory, "cpu_memory": c.cpu_memory, "nvme": c.nvme, "headroom": c.headroom,
                    "hardware": dataclasses.asdict(c.hardware)},
        "choice": _candidate_json(cfg, result.choice) if result.choice else None,
        "config_layout": _candidate_json(cfg, result.config_layout) if result.config_layout else None,
        "config_layout_error": result.config_error,
        "hints": advice,
        "candidates": [_candidate_json(cfg, cand) for cand in result.candidates],
        "verification": verification.to_json() if verification is not None else None,
    }
