"""Step time, per-rank peak memory and communication volume of every parallel layout.

Trains a small Translution ViT (the MNIST configuration: 84×84 images, 12×12 patches, a
7×7 grid and a class token; 2 blocks of 4 heads × 48) with the trainer's own code path
(``training.run.setup`` + ``build_backend`` + ``backend.train_step``: meta
construction, ``parallelism.parallelize``, FSDP2 or DeepSpeed, AdamW, gradient clipping) at
1, 2 and 4 CPU processes over gloo. The global batch is fixed at 8 samples per step, split
over the data-parallel ranks (tp/dispp peers share theirs), so every layout does the same work.

Every configuration runs in a fresh subprocess that starts its ranks with
``helpers.processes.run_in_processes`` (torchrun's environment, a new process group).
Per rank and optimizer step it measures:

* time — median and minimum over the timed steps of the slowest rank's step;
* peak memory — live tensor bytes (``helpers.memory_measure.LiveTensorBytes``: every
  storage from its creation to its death, FSDP2's storage resizes included) in a steady step,
  and the bytes already live when that step starts (parameters and optimizer states);
* collectives — every ``c10d``/``_c10d_functional`` op issued, seen by a dispatch mode in one
  step: its payload (the larger of its input and output, i.e. the full all-reduced,
  all-gathered or reduce-scattered tensor) by type, and the bytes a ring algorithm sends per
  rank for it, ``2(k−1)/k`` of the payload for an all-reduce and ``(k−1)/k`` otherwise;
* wire — loopback bytes (``/proc/net/dev``, ``lo`` transmit) over the timed steps divided by
  steps and ranks, and the bytes each rank wrote to its sockets (``wchar`` of
  ``/proc/self/io``; gloo sends with ``writev``), which other processes cannot disturb;
* analytic — ``launcher.step_cost.step_cost`` (what the planner ranks layouts by) and the
  peak of ``launcher.memory_model.estimate``.

Usage::

    python benchmarks/bench_parallel.py            # full run: table, JSON, docs/benchmarks.md
    python benchmarks/bench_parallel.py --quick    # smoke subset (seconds), JSON only
    python benchmarks/bench_parallel.py --only tp2,dispp2 --steps 3 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers (reference kernels, process runner, memory probe)

from bench_ops import QUIET_CORES, _machine_busy_seconds, _own_cpu_seconds, machine, write_docs

if TYPE_CHECKING:
    from training.config import Config

DOCS = ROOT / "docs" / "benchmarks.md"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_parallel.json"
DOCS_BEGIN, DOCS_END = "<!-- bench_parallel:begin -->", "<!-- bench_parallel:end -->"
MODEL_FILE = ROOT / "configs" / "models" / "mnist_vit_translution.yaml"
MODEL_OVERRIDES = ("model.depth=2", "model.heads=4", "model.dim_head=48")
"""Two blocks keep a step short; 4 heads × 48 (tiny has 3 × 64, the same C' = 192) let tp=2 divide the heads."""
GLOBAL_BATCH = 8
MIB = 2**20
WORKER_TIMEOUT_S = 1200
"""A layout still running after this long (a hung collective) is reported as failed."""


@dataclass(frozen=True)
class Layout:
    """One row of the benchmark: a ``--only`` key, a label, the process count and the config overrides."""

    key: str
    name: str
    procs: int
    overrides: tuple[str, ...]


LAYOUTS = (
    Layout("single", "one process", 1, ("parallel.engine=none",)),
    Layout("replicate2", "replicate ×2 (DDP-like: FSDP2, dp_replicate=2, dp_shard=1)", 2,
           ("parallel.engine=fsdp", "parallel.dp_replicate=2", "parallel.dp_shard=1")),
    Layout("fsdp2", "FSDP2 ZeRO-3 dp_shard=2", 2, ("parallel.engine=fsdp", "parallel.dp_shard=2")),
    Layout("fsdp2-offload", "FSDP2 dp_shard=2 + cpu_offload", 2,
           ("parallel.engine=fsdp", "parallel.dp_shard=2", "parallel.cpu_offload=true")),
    Layout("tp2", "tp=2 (heads)", 2, ("parallel.engine=none", "parallel.tp=2")),
    Layout("dispp2", "dispp=2 (displacements)", 2, ("parallel.engine=none", "parallel.dispp=2")),
    Layout("ds2", "DeepSpeed ZeRO-3 ×2", 2, ("parallel.engine=deepspeed",)),
    Layout("ds2-offload", "DeepSpeed ZeRO-3 ×2, params + optimizer on CPU", 2,
           ("parallel.engine=deepspeed", "parallel.offload_param=cpu", "parallel.offload_optimizer=cpu")),
    Layout("fsdp4", "FSDP2 ZeRO-3 dp_shard=4", 4, ("parallel.engine=fsdp", "parallel.dp_shard=4")),
    Layout("hsdp4", "HSDP: FSDP2 dp_replicate=2 × dp_shard=2", 4,
           ("parallel.engine=fsdp", "parallel.dp_replicate=2", "parallel.dp_shard=2")),
    Layout("tp2-fsdp2", "tp=2 × FSDP2 dp_shard=2", 4,
           ("parallel.engine=fsdp", "parallel.tp=2", "parallel.dp_shard=2")),
    Layout("dispp2-fsdp2", "dispp=2 × FSDP2 dp_shard=2", 4,
           ("parallel.engine=fsdp", "parallel.dispp=2", "parallel.dp_shard=2")),
    Layout("tp2-dispp2", "tp=2 × dispp=2", 4, ("parallel.engine=none", "parallel.tp=2", "parallel.dispp=2")),
    Layout("ds4", "DeepSpeed ZeRO-3 ×4", 4, ("parallel.engine=deepspeed",)),
)
QUICK = ("single", "fsdp2")


def build_config(overrides: tuple[str, ...] | list[str], procs: int) -> Config:
    """The run config of a layout, with the micro-batch that keeps the global batch at :data:`GLOBAL_BATCH`.

    Raises ``ValueError`` (a ``ConfigError``) where the config validation refuses the layout.
    """
    from pydantic import ValidationError

    from training.config import Config, ConfigError, apply_override, format_validation_error

    raw: dict[str, Any] = {"model": yaml.safe_load(MODEL_FILE.read_text()), "data": {"kind": "synthetic"},
                           "train": {"steps": 100},  # only sets the length of the learning-rate schedule
                           "tracking": {"enabled": False}}
    for override in (*MODEL_OVERRIDES, *overrides):
        apply_override(raw, override)
    try:
        cfg = Config.model_validate(raw)
        layout = cfg.parallel.resolve(procs)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from err
    data_parallel = layout.dp_replicate * layout.dp_shard
    if GLOBAL_BATCH % data_parallel:
        raise ConfigError(f"the global batch {GLOBAL_BATCH} does not split over {data_parallel} data-parallel ranks")
    cfg.train.micro_batch_size = GLOBAL_BATCH // data_parallel
    return cfg


# ---------------------------------------------------------------- measurement (rank side)

COLLECTIVE_KINDS = (("all_reduce", ("allreduce", "all_reduce")), ("all_gather", ("allgather", "all_gather")),
                    ("reduce_scatter", ("reduce_scatter",)), ("broadcast", ("broadcast",)),
                    ("all_to_all", ("alltoall", "all_to_all")))
NOT_MOVING = ("wait_tensor", "_wrap_tensor_autograd", "barrier")
"""``c10d`` ops that move no tensor data of their own."""


def _collective_kind(op_name: str) -> str:
    for kind, markers in COLLECTIVE_KINDS:
        if any(marker in op_name for marker in markers):
            return kind
    return "other"


def _group_size(args: tuple) -> int:
    """The size of the process group a collective runs on: a ``ProcessGroup`` argument, or a group name."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for arg in args:
        if isinstance(arg, torch.ScriptObject) and arg._type().qualified_name().endswith("c10d.ProcessGroup"):
            return dist.ProcessGroup.unbox(arg).size()
    for arg in reversed(args):  # functional collectives name their group last
        if isinstance(arg, str):
            try:
                return _resolve_process_group(arg).size()
            except (RuntimeError, ValueError, KeyError):
                continue
    raise RuntimeError("collective without a process group argument")


def _tensor_bytes(value: Any) -> int:
    leaves, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class CollectiveCounter(TorchDispatchMode):
    """Payload and ring send bytes of every collective issued while active, by type.

    Sees both the ``c10d`` ops behind ``torch.distributed`` (FSDP2, DeepSpeed, the dispp
    softmax) and DTensor's functional collectives (tp). Collectives on a group of one rank
    move nothing and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: dict[str, dict[str, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local ops (and collectives), which come back here
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if "c10d" in func.namespace and not any(skip in name for skip in NOT_MOVING):
            group = _group_size(args)
            if group > 1:
                payload = max(_tensor_bytes(out), *(_tensor_bytes(a) for a in args))
                kind = _collective_kind(name)
                ring = (2 if kind == "all_reduce" else 1) * payload * (group - 1) // group
                entry = self.by_kind.setdefault(kind, {"count": 0, "payload_bytes": 0, "ring_bytes": 0})
                entry["count"] += 1
                entry["payload_bytes"] += payload
                entry["ring_bytes"] += ring
        return out


def _loopback_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _written_bytes() -> int:
    """Bytes this process passed to write-like system calls: gloo's socket sends (and a few log lines)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def rank_main(rank: int, world_size: int, spec: dict) -> dict:
    """One rank of one layout: build through the trainer's path, measure memory, time, collectives."""
    import torch.distributed as dist

    from helpers.memory_measure import LiveTensorBytes
    from training.run import build_backend, setup
    from training.tasks import ClassificationTask

    cfg = build_config(spec["overrides"], world_size)
    model = cfg.model
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, model.channels, model.image_size, model.image_size, generator=generator)
    labels = torch.randint(model.num_classes, (GLOBAL_BATCH,), generator=generator)
    tracker = LiveTensorBytes()
    with tracker:  # from construction on, so that parameters and optimizer states count
        ctx = setup(cfg)
        backend = build_backend(cfg, ctx)
        rows = slice(ctx.dp_rank * cfg.train.micro_batch_size, (ctx.dp_rank + 1) * cfg.train.micro_batch_size)
        batch = [(images[rows], labels[rows])]
        task = ClassificationTask()

        def step():
            return backend.train_step(batch, task.step)

        step()  # optimizer states appear in the first step; the next is the steady state
        start_bytes = tracker.live
        tracker.reset_peak()
        step()
        peak_bytes, peak_op = tracker.peak, tracker.peak_op
    step()  # untracked warm-up
    dist.barrier()
    lo, busy = (_loopback_tx_bytes(), _machine_busy_seconds()) if rank == 0 else (0, 0.0)
    sent, cpu, started = _written_bytes(), _own_cpu_seconds(), time.perf_counter()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    window = time.perf_counter() - started
    sent, cpu = _written_bytes() - sent, _own_cpu_seconds() - cpu
    if rank == 0:
        lo, busy = _loopback_tx_bytes() - lo, _machine_busy_seconds() - busy
    counter = CollectiveCounter()
    with counter:
        step()
    return dict(times=times, peak_bytes=peak_bytes, peak_op=peak_op, start_bytes=start_bytes,
                sent_bytes=sent, cpu_seconds=cpu, window_seconds=window, loopback_bytes=lo, busy_seconds=busy,
                collectives=counter.by_kind)


def run_worker(spec: dict) -> dict:
    """All ranks of one layout in fresh processes; per-rank figures combined into per-step, per-rank ones."""
    from helpers.processes import run_in_processes

    procs, steps = spec["procs"], spec["steps"]
    ranks = run_in_processes(rank_main, procs, spec, timeout_s=600, procs_per_node=spec.get("procs_per_node"))
    slowest = sorted(max(r["times"][i] for r in ranks) for i in range(steps))
    window = ranks[0]["window_seconds"]
    other_cores = max(0.0, (ranks[0]["busy_seconds"] - sum(r["cpu_seconds"] for r in ranks)) / window)
    kinds = sorted({kind for r in ranks for kind in r["collectives"]})
    collectives = {kind: {field: statistics.fmean(r["collectives"].get(kind, {}).get(field, 0) for r in ranks)
                          for field in ("count", "payload_bytes", "ring_bytes")} for kind in kinds}
    return dict(
        ms_median=statistics.median(slowest) * 1e3, ms_min=slowest[0] * 1e3, steps=steps,
        other_load_cores=other_cores, quiet=other_cores < QUIET_CORES,
        peak_mib=max(r["peak_bytes"] for r in ranks) / MIB, peak_op=max(ranks, key=lambda r: r["peak_bytes"])["peak_op"],
        start_mib=max(r["start_bytes"] for r in ranks) / MIB,
        collectives=collectives,
        ring_mib=sum(c["ring_bytes"] for c in collectives.values()) / MIB,
        payload_mib=sum(c["payload_bytes"] for c in collectives.values()) / MIB,
        wire_mib=ranks[0]["loopback_bytes"] / steps / procs / MIB,
        sent_mib=statistics.fmean(r["sent_bytes"] for r in ranks) / steps / MIB,
    )


# ---------------------------------------------------------------- driver


def run_in_subprocess(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return dict(status="failed", error=f"no result after {WORKER_TIMEOUT_S} s")
    if proc.returncode != 0:
        return dict(status="failed", error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?")
    return dict(status="ok", **json.loads(proc.stdout.strip().splitlines()[-1]))


def analytic(cfg: Config, procs: int) -> dict:
    """The planner's figures for this layout: bytes moved per step (one node) and the estimated peak."""
    from launcher.memory_model import RunShape, estimate
    from launcher.step_cost import step_cost

    layout = cfg.parallel.resolve(procs)
    cost = step_cost(cfg, layout, procs_per_node=procs)
    peak = estimate(RunShape(cfg.model, cfg.train.micro_batch_size, cfg.train.precision, "cpu",
                             cfg.train.grad_accum), layout).peak_total
    return dict(analytic_mib=(cost.intra_node + cost.inter_node) / MIB, model_peak_mib=peak / MIB)


def measure_layout(layout: Layout, steps: int) -> dict:
    row: dict[str, Any] = dict(key=layout.key, name=layout.name, procs=layout.procs, overrides=list(layout.overrides))
    try:
        cfg = build_config(layout.overrides, layout.procs)
    except ValueError as err:
        return dict(row, status="refused", error=str(err))
    row.update(micro_batch=cfg.train.micro_batch_size, **analytic(cfg, layout.procs))
    row.update(run_in_subprocess(dict(overrides=list(layout.overrides), procs=layout.procs, steps=steps)))
    if row["status"] == "ok" and row["analytic_mib"] > 0:
        row["ring_over_analytic"] = row["ring_mib"] / row["analytic_mib"]
        row["wire_over_analytic"] = row["wire_mib"] / row["analytic_mib"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"layouts {', '.join(QUICK)}, 2 timed steps (no docs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"markdown file whose results section is refreshed (default {DOCS} unless --quick/--only)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout (default 10; 2 with --quick)")
    parser.add_argument("--only", type=str, default=None,
                        help="comma-separated layout keys: " + ", ".join(layout.key for layout in LAYOUTS))
    parser.add_argument("--worker", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    keys = args.only.split(",") if args.only else (QUICK if args.quick else [layout.key for layout in LAYOUTS])
    unknown = set(keys) - {layout.key for layout in LAYOUTS}
    if unknown:
        parser.error(f"unknown layouts {sorted(unknown)}; choose among {[layout.key for layout in LAYOUTS]}")
    steps = args.steps or (2 if args.quick else 10)
    started = time.time()
    rows = []
    selected = [layout for layout in LAYOUTS if layout.key in keys]
    for i, layout in enumerate(selected, 1):
        row = measure_layout(layout, steps)
        print(f"[{i}/{len(selected)}] {progress_line(row)}", flush=True)
        rows.append(row)

    from launcher.memory_model import model_census

    cfg = build_config((), 1)
    d = cfg.model.dims
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        machine=dict(machine(), torch_threads=1), seconds=time.time() - started,
        settings=dict(model=f"{os.path.relpath(MODEL_FILE, ROOT)} " + " ".join(MODEL_OVERRIDES), dim=d.dim,
                      depth=d.depth, heads=d.heads, dim_head=d.dim_head, mlp_dim=d.mlp_dim,
                      tokens=cfg.model.layout().max_tokens, displacements=cfg.model.layout().num_displacements,
                      params=model_census(cfg.model).numel, global_batch=GLOBAL_BATCH,
                      timed_steps=steps, threads_per_process=1),
        layouts=rows,
    )
    text = render(report)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    docs = args.docs if args.docs is not None else (None if args.quick or args.only else DOCS)
    if docs is not None:
        write_docs(docs, text, report, (DOCS_BEGIN, DOCS_END))
        print(f"refreshed {docs}")


# ---------------------------------------------------------------- reporting


def progress_line(row: dict) -> str:
    head = f"{row['procs']} × {row['name']:55s}"
    if row["status"] == "refused":
        return f"{head} refused: {row['error']}"
    if row["status"] != "ok":
        return f"{head} FAILED: {row['error']}"
    ratio = f" ({row['ring_over_analytic']:.2f}× analytic)" if "ring_over_analytic" in row else ""
    quiet = "" if row["quiet"] else f" (DISTURBED: other processes used {row['other_load_cores']:.1f} cores)"
    return (f"{head} {row['ms_median']:.0f} ms, peak {row['peak_mib']:.0f} MiB, collectives {row['ring_mib']:.1f} "
            f"MiB{ratio}, wire {row['wire_mib']:.1f} MiB per rank{quiet}")


def _mib(value: float) -> str:
    """MiB with one decimal; the scalar all-reduces of the loss and gradient norm (below 0.05 MiB) in KiB or bytes."""
    if value >= 0.05 or value == 0:
        return f"{value:.1f}"
    return f"{value * 1024:.1f} KiB" if value * 1024 >= 1 else f"{value * MIB:.0f} B"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "–"


def render(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    ok = [r for r in report["layouts"] if r["status"] == "ok"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}, Python {m['python']}; "
        f"gloo over loopback, 1 torch thread per process.",
        f"Date: {report['date']}. Command: `{report['command']}` ({report['seconds'] / 60:.1f} min).",
        f"Model: Translution ViT, `{s['model']}`: width {s['dim']}, {s['depth']} blocks, {s['heads']} heads × "
        f"{s['dim_head']}, MLP {s['mlp_dim']}, {s['tokens']} tokens, K = {s['displacements']} displacements, "
        f"{s['params'] / 1e6:.1f} M parameters. Global batch {s['global_batch']} per step; "
        f"{s['timed_steps']} timed steps per layout.",
        "",
        "### Time and memory per rank",
        "",
        "| procs | layout | batch per rank | ms/step: median (min) | peak MiB (max over ranks) | "
        "live at step start MiB | memory model MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["layouts"]:
        if r["status"] != "ok":
            lines.append(f"| {r['procs']} | {r['name']} | – | {r['status']} | – | – | – |")
            continue
        time_cell = f"{r['ms_median']:.0f} ({r['ms_min']:.0f})" + ("" if r["quiet"] else " †")
        lines.append(f"| {r['procs']} | {r['name']} | {r['micro_batch']} | {time_cell} | {r['peak_mib']:.0f} | "
                     f"{r['start_mib']:.0f} | {r['model_peak_mib']:.0f} |")
    lines += [
        "",
        "### Communication per step and rank (MiB)",
        "",
        "Collective payloads by type (count in parentheses); *ring*: what ring algorithms send per rank for them; "
        "*wire*: loopback bytes / steps / ranks; *sent*: bytes each rank wrote to its sockets; *analytic*: "
        "`launcher.step_cost`.",
        "",
        "| procs | layout | all-reduce | all-gather | reduce-scatter | ring | wire | sent | analytic "
        "| ring / analytic | wire / analytic |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        c = r["collectives"]
        cells = []
        for kind in ("all_reduce", "all_gather", "reduce_scatter"):
            entry = c.get(kind)
            cells.append(f"{_mib(entry['payload_bytes'] / MIB)} ({entry['count']:.0f})" if entry else "–")
        others = {k: v for k, v in c.items() if k not in ("all_reduce", "all_gather", "reduce_scatter")}
        if others:
            cells[-1] += " + " + ", ".join(f"{k} {_mib(v['payload_bytes'] / MIB)} ({v['count']:.0f})"
                                           for k, v in others.items())
        lines.append(f"| {r['procs']} | {r['name']} | {' | '.join(cells)} | {_mib(r['ring_mib'])} | "
                     f"{_mib(r['wire_mib'])} | {_mib(r['sent_mib'])} | {_mib(r['analytic_mib'])} | "
                     f"{_ratio(r, 'ring_over_analytic')} | {_ratio(r, 'wire_over_analytic')} |")
    refused = [r for r in report["layouts"] if r["status"] == "refused"]
    failed = [r for r in report["layouts"] if r["status"] == "failed"]
    if refused:
        lines += ["", "Refused by the config validation: " + "; ".join(f"{r['name']} ({r['error']})" for r in refused)]
    if failed:
        lines += ["", "**Failed:** " + "; ".join(f"{r['name']} ({r['error']})" for r in failed)]
    disturbed = [r for r in ok if not r["quiet"]]
    lines += ["", f"Times are the slowest rank's, per step. † other processes used ≥ {QUIET_CORES} cores during the "
                  f"timed steps ({len(disturbed)} of {len(ok)} layouts): those times are disturbed."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
