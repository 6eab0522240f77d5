"""Time and peak memory of one attention layer (forward + backward) and of one model step.

Compares self-attention, α-Translution, full Translution (this project's memory-bounded
kernels) and two naive materializing implementations (``models/reference.py``): the
official code's algorithm (a broadcast matmul that copies the gathered bank per sample) and
a leaner one (an ``einsum`` against the gathered bank), on image grids and causal sequences, and reports the achieved matmul
rate of full Translution against this machine's measured fp32 ``sgemm`` rate.

Every configuration runs in a fresh subprocess, so peaks do not mix. Two peaks are
reported, both as the increase over the state after building the layer and its inputs:

* tensors — every CPU tensor allocation and free of one forward + backward, replayed from
  the profiler's memory events (``profile_memory=True``): the exact peak of live tensor
  bytes, independent of the allocator;
* RSS — the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
  after ``malloc_trim``), which adds allocator slack and library workspaces.

Usage::

    python benchmarks/bench_ops.py            # full run: table, JSON, docs/benchmarks.md
    python benchmarks/bench_ops.py --quick    # smoke subset (seconds), JSON only
    python benchmarks/bench_ops.py --device cuda --layouts grid14,causal160 --sweep-mib ''   # on a GPU, JSON only

On a GPU, *tensors* is the increase of ``torch.cuda.max_memory_allocated`` (GPU memory) and
*RSS* the host process's, times are taken after ``torch.cuda.synchronize``, the matmul
reference is the GPU's fp32 matmul, and the profiler breakdown (CPU self time) is skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers (reference kernels, process runner, memory probe)
DOCS = ROOT / "docs" / "benchmarks.md"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_ops.json"
NAIVE_LIMIT_BYTES = 16 << 30
DOCS_BEGIN, DOCS_END = "<!-- bench_ops:begin -->", "<!-- bench_ops:end -->"
KINDS = ("self_attention", "alpha", "translution", "naive", "official")
NAIVE_KINDS = ("naive", "official")
KIND_NAMES = {"self_attention": "self-attention", "alpha": "α-Translution (r=8)",
              "translution": "Translution (ours)", "naive": "naive (materializing)",
              "official": "official-style naive"}


# ---------------------------------------------------------------- configurations


def layout_of(spec: str):
    """``grid7`` → 7×7 image grid (with a class token); ``causal64`` → causal window of 64."""
    from translution_dist.ops import CausalLayout, ImageGridLayout

    if spec.startswith("grid"):
        side = int(spec[4:])
        return ImageGridLayout(side, side)
    return CausalLayout(int(spec[6:]))


def layout_label(spec: str) -> str:
    return f"{spec[4:]}×{spec[4:]} grid" if spec.startswith("grid") else f"causal T={spec[6:]}"


def allowed_pairs(spec: str) -> int:
    """N² for a grid (every pair), N(N+1)/2 for a causal sequence."""
    layout = layout_of(spec)
    n = layout.max_tokens
    return n * n if spec.startswith("grid") else n * (n + 1) // 2


def naive_estimate_bytes(spec: str, kind: str, batch: int, dim: int, inner: int) -> int:
    """Peak of a naive forward + backward, estimated as four gathered ``[N, N, C, C']`` banks.

    Forward keeps the q, k and v gathers for backward; backward adds the gradient of one
    gather at a time. The official-style version copies them per sample (``B`` times).
    (Checked against the measured peaks of the configurations it runs.)
    """
    n = layout_of(spec).max_tokens
    return 4 * n * n * dim * inner * 4 * (batch if kind == "official" else 1)


LAYOUTS = ("grid4", "grid7", "grid14", "causal64", "causal160")


def layer_configs(quick: bool, budget: int | None, layouts: list[str]) -> list[dict]:
    layouts = ["grid4"] if quick else layouts
    return [dict(task="layer", group="layers", layout=spec, kind=kind, batch=2 if quick else 8, budget=budget)
            for spec in layouts for kind in KINDS]


def sweep_configs(budgets_mib: list[int]) -> list[dict]:
    return [dict(task="layer", group="sweep", layout=spec, kind="translution", batch=8, budget=mib << 20)
            for spec in ("grid7", "grid14", "causal160") for mib in budgets_mib]


def breakdown_configs(quick: bool, budget: int | None, layouts: list[str]) -> list[dict]:
    layouts = ["grid4"] if quick else [spec for spec in ("grid7", "grid14", "causal160") if spec in layouts]
    return [dict(task="layer", group="breakdown", breakdown=True, layout=spec, kind="translution",
                 batch=2 if quick else 8, budget=budget) for spec in layouts]


def model_configs(quick: bool, budget: int | None) -> list[dict]:
    kinds = ["translution"] if quick else ["self_attention", "alpha", "translution"]
    return [dict(task="model", group="models", kind=kind, batch=2 if quick else 8, budget=budget) for kind in kinds]


# ---------------------------------------------------------------- measurement (worker side)

WIDTH, HEADS, DIM_HEAD, ALPHA_RANK = 192, 3, 64, 8


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_increase(step, clear) -> int:
    """Peak resident set of one ``step()`` above the resident set before it (after ``clear()``)."""
    clear()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse shows as growth
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _rss_bytes("VmRSS")
    step()
    return _rss_bytes("VmHWM") - base


def peak_tensor_increase(step, clear) -> int:
    """Peak of live CPU tensor bytes during one ``step()`` (after ``clear()``), from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    clear()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


QUIET_CORES = 0.3
"""An iteration during which other processes used less CPU than this counts as undisturbed."""


def time_steps(step, min_seconds: float, min_iters: int, patience_seconds: float) -> dict:
    """Warm up, then time ``step()`` until ``min_iters`` undisturbed iterations (and ``min_seconds``).

    Each iteration also measures how many cores other processes kept busy meanwhile (from
    ``/proc/stat`` less this process's CPU time); min and median are taken over the
    undisturbed iterations, or over all of them if fewer than ``min_iters`` were found
    within ``patience_seconds`` (then ``quiet`` is false).
    """
    warm_until = time.perf_counter() + min_seconds / 2
    step()
    while time.perf_counter() < warm_until:
        step()
    samples = []
    start = time.perf_counter()
    while True:
        busy0, own0, t0 = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        other = ((_machine_busy_seconds() - busy0) - (_own_cpu_seconds() - own0)) / dt
        samples.append((dt, max(0.0, other)))
        quiet = sorted(t for t, o in samples if o < QUIET_CORES)
        elapsed = time.perf_counter() - start
        if (len(quiet) >= min_iters and elapsed >= min_seconds) or elapsed >= patience_seconds:
            break
    enough = len(quiet) >= min_iters
    times = quiet if enough else sorted(t for t, _ in samples)
    loads = sorted(o for _, o in samples)
    return dict(ms_min=times[0] * 1e3, ms_median=times[len(times) // 2] * 1e3, iterations=len(samples),
                quiet_iterations=len(quiet), quiet=enough, other_load_cores=loads[len(loads) // 2])


def peak_cuda_increase(step, clear) -> int:
    """Peak GPU memory allocated during one ``step()`` above what was allocated before it (after ``clear()``)."""
    clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _synchronized(step):
    """``step`` followed by a wait for the GPU's queued work (so that its time is the work's)."""
    def run():
        step()
        torch.cuda.synchronize()
    return run


def _layer_step(cfg: dict):
    from helpers.reference import naive_translution
    from translution_dist.models.attention import (
        AlphaTranslutionAttention,
        SelfAttention,
        TranslutionAttention,
        set_pair_chunk_bytes,
    )

    torch.manual_seed(0)
    layout = layout_of(cfg["layout"])
    n, batch = layout.max_tokens, cfg["batch"]
    causal = cfg["layout"].startswith("causal")
    kind = cfg["kind"]
    if kind == "self_attention":
        layer = SelfAttention(layout, WIDTH, HEADS, DIM_HEAD, position="none", causal=causal)
    elif kind == "alpha":
        layer = AlphaTranslutionAttention(layout, WIDTH, HEADS, DIM_HEAD, rank=ALPHA_RANK)
    else:
        layer = TranslutionAttention(layout, WIDTH, HEADS, DIM_HEAD)
    if cfg["budget"] is not None:
        set_pair_chunk_bytes(layer, cfg["budget"])
    device = cfg.get("device", "cpu")
    layer.to(device)
    x = torch.randn(batch, n, WIDTH, device=device, requires_grad=True)
    grad = torch.randn(batch, n, WIDTH, device=device)
    if kind in NAIVE_KINDS:
        forward = lambda: naive_translution(layer, x, per_sample_bank=kind == "official")  # noqa: E731
    else:
        forward = lambda: layer(x)  # noqa: E731

    def clear():
        layer.zero_grad(set_to_none=True)
        x.grad = None

    def step():
        clear()
        forward().backward(grad)

    return step, clear


def _model_step(cfg: dict):
    import torch.nn.functional as F

    from translution_dist.models import ModelConfig, build_model
    from translution_dist.models.attention import set_pair_chunk_bytes

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vit", attention=cfg["kind"], preset="tiny", image_size=84,
                                    patch_size=12, channels=1, num_classes=10))
    if cfg["budget"] is not None:
        set_pair_chunk_bytes(model, cfg["budget"])
    device = cfg.get("device", "cpu")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(cfg["batch"], 1, 84, 84, device=device)
    labels = torch.randint(0, 10, (cfg["batch"],), device=device)

    def clear():
        optimizer.zero_grad(set_to_none=True)

    def step():
        clear()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # AdamW allocates its state on the first step; measure steady steps
    return step, clear


OP_GROUPS = {
    "aten::bmm": "bmm",
    "aten::index_select": "gathers", "aten::index": "gathers",
    "aten::index_add_": "scatters", "aten::scatter_add_": "scatters", "aten::index_copy_": "scatters",
    "aten::index_put_": "scatters", "aten::_index_put_impl_": "scatters",
    "aten::mul": "elementwise", "aten::mul_": "elementwise", "aten::sum": "elementwise",
    "aten::copy_": "copies", "aten::cat": "copies", "aten::clone": "copies", "aten::contiguous": "copies",
    "aten::fill_": "copies", "aten::zero_": "copies", "aten::index_fill_": "copies",
}


def breakdown(step, iterations: int) -> dict:
    """Where a step's time goes: profiler self time by op group, and the rate of ``bmm`` itself.

    Each of ``iterations`` steps is profiled on its own and the fastest is kept (the least
    disturbed by other processes). ``bmm`` FLOPs are counted from the recorded shapes
    (padding included); ``python`` is the wall time left after all ops' self time.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    best = None
    for _ in range(iterations):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            step()
            wall = time.perf_counter() - start
        if best is None or wall < best[0]:
            best = wall, prof.key_averages(group_by_input_shape=True)
    wall, events = best
    groups: dict[str, float] = {}
    bmm_flops = 0
    for event in events:
        group = OP_GROUPS.get(event.key, "other ops")
        groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6
        if event.key == "aten::bmm":
            (d, m, k), (_, _, n) = event.input_shapes[:2]
            bmm_flops += 2 * d * m * k * n * event.count
    groups["python"] = max(0.0, wall - sum(groups.values()))
    return dict(wall_ms=wall * 1e3, share={g: t / wall for g, t in groups.items()},
                ms={g: t * 1e3 for g, t in groups.items()}, bmm_gflop=bmm_flops / 1e9,
                bmm_gflops=bmm_flops / (groups["bmm"] * 1e9))


def run_worker(cfg: dict) -> dict:
    quick = cfg.get("quick", False)
    step, clear = _layer_step(cfg) if cfg["task"] == "layer" else _model_step(cfg)
    cuda = cfg.get("device", "cpu") == "cuda"
    if cuda:
        step = _synchronized(step)
    step()  # plans, caches
    if cfg.get("breakdown"):
        return breakdown(step, iterations=2 if quick else 15)
    tensors = peak_cuda_increase if cuda else peak_tensor_increase
    result = dict(peak_rss_mib=peak_rss_increase(step, clear) / 2**20, peak_tensor_mib=tensors(step, clear) / 2**20)
    slow = cfg["kind"] in NAIVE_KINDS
    result.update(time_steps(step, min_seconds=0.2 if quick else (2.0 if slow else 3.0),
                             min_iters=2 if quick else (3 if slow else 10),
                             patience_seconds=1.0 if quick else (240.0 if slow else 120.0)))
    return result


def matmul_gflops(size: int, repeats: int, patience_seconds: float, device: str = "cpu") -> tuple[float, bool]:
    """Best fp32 ``size³`` matmul rate (GFLOP/s) over ``repeats`` undisturbed runs, and whether they were found."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    matmul = _synchronized(lambda: a @ b) if device == "cuda" else (lambda: a @ b)
    matmul()
    quiet, every = [], []
    start = time.perf_counter()
    while len(quiet) < repeats and (time.perf_counter() - start < patience_seconds or not every):
        busy0, own0, t0 = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        matmul()
        dt = time.perf_counter() - t0
        every.append(dt)
        if ((_machine_busy_seconds() - busy0) - (_own_cpu_seconds() - own0)) / dt < QUIET_CORES:
            quiet.append(dt)
    return 2 * size**3 / min(quiet or every) / 1e9, len(quiet) >= repeats


# ---------------------------------------------------------------- driver


def run_in_subprocess(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(status="failed", error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?")
    return dict(status="ok", **json.loads(proc.stdout.strip().splitlines()[-1]))


def add_rates(row: dict, matmul: float) -> None:
    """Counted (6·B·P·C·C' forward, twice that backward) and executed (4× forward) rates."""
    if row["group"] not in ("layers", "sweep") or row["kind"] not in ("translution", *NAIVE_KINDS) or row["status"] != "ok":
        return
    forward = 6 * row["batch"] * row["pairs"] * WIDTH * (HEADS * DIM_HEAD)
    seconds = row["ms_min"] / 1e3
    row["gflop_counted"] = 3 * forward / 1e9
    row["gflops_counted"] = 3 * forward / seconds / 1e9
    row["pct_matmul"] = 100 * row["gflops_counted"] / matmul
    if row["kind"] == "translution":  # backward recomputes the per-pair projections
        row["gflops_executed"] = 4 * forward / seconds / 1e9


def machine(device: str = "cpu") -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if device == "cuda" else {}
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), memory_gib=round(os.sysconf("SC_PAGE_SIZE")
                                                                   * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), **gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke subset that runs in seconds (no docs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"markdown file whose results table is refreshed (default {DOCS} unless --quick)")
    parser.add_argument("--pair-chunk-mib", type=int, default=None,
                        help="pair-chunk budget of the Translution kernels (default: the library default)")
    parser.add_argument("--sweep-mib", type=str, default="4,8,16,32,64",
                        help="pair-chunk budgets (MiB) to sweep for Translution; empty to skip (skipped by --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the layers and models run (cuda: the first GPU; no docs unless --docs)")
    parser.add_argument("--layouts", type=str, default=",".join(LAYOUTS),
                        help=f"layer layouts, comma-separated, among {', '.join(LAYOUTS)} (default: all)")
    parser.add_argument("--worker", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    from translution_dist.models.attention import DEFAULT_PAIR_CHUNK_BYTES

    budget = None if args.pair_chunk_mib is None else args.pair_chunk_mib << 20
    layouts = args.layouts.split(",")
    if unknown := sorted(set(layouts) - set(LAYOUTS)):
        parser.error(f"--layouts: unknown {', '.join(unknown)}; choose among {', '.join(LAYOUTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    started = time.time()
    matmul, matmul_quiet = matmul_gflops(512 if args.quick else 4096, 3 if args.quick else 7,
                                         patience_seconds=1.0 if args.quick else 120.0, device=args.device)
    print(f"fp32 matmul: {matmul:.1f} GFLOP/s ({torch.get_num_threads()} threads)"
          + ("" if matmul_quiet else " (DISTURBED by other processes)"), flush=True)
    sweep = [] if args.quick or not args.sweep_mib else [int(v) for v in args.sweep_mib.split(",")]
    breakdowns = [] if args.device == "cuda" else breakdown_configs(args.quick, budget, layouts)
    configs = (layer_configs(args.quick, budget, layouts) + breakdowns
               + model_configs(args.quick, budget) + sweep_configs(sweep))
    rows = []
    for i, cfg in enumerate(configs, 1):
        cfg = dict(cfg, quick=args.quick, device=args.device)
        row = dict(cfg)
        if cfg["task"] == "layer":
            row["pairs"] = allowed_pairs(cfg["layout"])
            row["tokens"] = layout_of(cfg["layout"]).max_tokens
            estimate = naive_estimate_bytes(cfg["layout"], cfg["kind"], cfg["batch"], WIDTH, HEADS * DIM_HEAD)
            if cfg["kind"] in NAIVE_KINDS:
                row["naive_estimate_gib"] = estimate / 2**30
            if cfg["kind"] in NAIVE_KINDS and estimate > NAIVE_LIMIT_BYTES:
                row["status"] = "skipped"
            else:
                row.update(run_in_subprocess(cfg))
        else:
            row.update(run_in_subprocess(cfg))
        add_rates(row, matmul)
        print(f"[{i}/{len(configs)}] {progress_line(row)}", flush=True)
        rows.append(row)

    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        machine=machine(args.device), device=args.device, matmul_gflops=matmul, matmul_quiet=matmul_quiet, seconds=time.time() - started,
        settings=dict(batch=2 if args.quick else 8, width=WIDTH, heads=HEADS, dim_head=DIM_HEAD,
                      alpha_rank=ALPHA_RANK, pair_chunk_bytes=budget or DEFAULT_PAIR_CHUNK_BYTES),
        **{group: [r for r in rows if r["group"] == group] for group in ("layers", "breakdown", "models", "sweep")},
    )
    report["targets"] = targets(report["layers"], matmul)
    text = render(report)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    docs = args.docs if args.docs is not None else (None if args.quick or args.device != "cpu" else DOCS)
    if docs is not None:
        write_docs(docs, text, report)
        print(f"refreshed {docs}")


# ---------------------------------------------------------------- reporting


def progress_line(row: dict) -> str:
    where = layout_label(row["layout"]) if row["task"] == "layer" else "ViT-tiny 7×7 step"
    budget = "" if row["budget"] is None else f" budget {row['budget'] >> 20} MiB"
    head = f"{where:16s} {KIND_NAMES[row['kind']]:22s}{budget}"
    if row["status"] == "skipped":
        return f"{head} skipped (est. {row['naive_estimate_gib']:.1f} GiB)"
    if row["status"] != "ok":
        return f"{head} FAILED: {row['error']}"
    if row.get("breakdown"):
        return f"{head} breakdown: {row['wall_ms']:.1f} ms, bmm {row['share']['bmm']:.0%} at {row['bmm_gflops']:.0f} GFLOP/s"
    rate = f", {row['gflops_counted']:.0f} GFLOP/s counted" if "gflops_counted" in row else ""
    quiet = "" if row["quiet"] else f" (DISTURBED: other processes used {row['other_load_cores']:.1f} cores)"
    return (f"{head} {row['ms_median']:.1f} ms (min {row['ms_min']:.1f}), peak {row['peak_tensor_mib']:.1f} MiB"
            f"{rate}{quiet}")


def targets(layers: list[dict], matmul: float) -> dict:
    """The 7×7 targets: speed and memory against each naive version, and the share of the matmul rate."""
    pick = {r["kind"]: r for r in layers if r["layout"] == "grid7" and r["status"] == "ok"}
    ours = pick.get("translution")
    if ours is None:
        return {}
    against = {kind: dict(speedup_min=naive["ms_min"] / ours["ms_min"],
                          speedup_median=naive["ms_median"] / ours["ms_median"],
                          memory_ratio=naive["peak_tensor_mib"] / ours["peak_tensor_mib"],
                          memory_ratio_rss=naive["peak_rss_mib"] / max(ours["peak_rss_mib"], 1e-9))
               for kind, naive in pick.items() if kind in NAIVE_KINDS}
    return dict(against=against, pct_matmul_min=ours["pct_matmul"],
                pct_matmul_median=100 * ours["gflop_counted"] / (ours["ms_median"] / 1e3) / matmul)


def _cell_time(r: dict) -> str:
    if r["status"] == "skipped":
        return f"skipped (est. {r['naive_estimate_gib']:.0f} GiB)"
    if r["status"] != "ok":
        return "failed"
    return f"{r['ms_median']:.1f} ({r['ms_min']:.1f})" + ("" if r["quiet"] else " †")


def _cell_mem(r: dict) -> str:
    return f"{r['peak_tensor_mib']:.1f} / {r['peak_rss_mib']:.1f}" if r["status"] == "ok" else "–"


def _cell_rate(r: dict) -> str:
    if "gflops_counted" not in r:
        return "–"
    executed = f" / {r['gflops_executed']:.0f}" if "gflops_executed" in r else ""
    return f"{r['gflops_counted']:.0f}{executed} ({r['pct_matmul']:.0f}%)"


def render(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gib']} GiB; "
        f"torch {m['torch']}, Python {m['python']}. Measured fp32 matmul (4096³ sgemm, best of 7): "
        f"**{report['matmul_gflops']:.0f} GFLOP/s**" + ("." if report["matmul_quiet"] else " († disturbed)."),
        *([f"Device: **{m['gpu']}** (CUDA {m['cuda']}); peak tensors are GPU memory, RSS the host process's."]
          if "gpu" in m else []),
        f"Date: {report['date']}. Command: `{report['command']}`.",
        f"Layer: batch {s['batch']}, width {s['width']}, {s['heads']} heads × {s['dim_head']}, "
        f"pair-chunk budget {s['pair_chunk_bytes'] >> 20} MiB.",
        "",
        "### One layer, forward + backward",
        "",
        "| layout | tokens (pairs) | attention | ms: median (min) | peak MiB: tensors / RSS "
        "| GFLOP/s counted / executed (% of matmul) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["layers"]:
        lines.append(f"| {layout_label(r['layout'])} | {r['tokens']} ({r['pairs']}) | {KIND_NAMES[r['kind']]} | "
                     f"{_cell_time(r)} | {_cell_mem(r)} | {_cell_rate(r)} |")
    t = report["targets"]
    if t:
        lines += ["", "Targets at 7×7 (full Translution): "
                  f"**{t['pct_matmul_min']:.0f}% of the matmul rate** counted by min time "
                  f"({t['pct_matmul_median']:.0f}% by median)."]
        for kind, v in t["against"].items():
            lines.append(f"Against the {KIND_NAMES[kind]}: **{v['speedup_median']:.0f}× faster** (median; "
                         f"{v['speedup_min']:.0f}× by min), **{v['memory_ratio']:.0f}× less peak tensor memory** "
                         f"({v['memory_ratio_rss']:.0f}× by RSS).")
    if report["breakdown"]:
        groups = ["bmm", "gathers", "scatters", "elementwise", "copies", "other ops", "python"]
        lines += ["", "### Where full Translution's time goes (profiler self time, one layer forward + backward)", "",
                  "| layout | ms (profiled) | " + " | ".join(groups) + " | bmm GFLOP/s at the kernel's shapes |",
                  "|---|---|" + "---|" * len(groups) + "---|"]
        for r in report["breakdown"]:
            if r["status"] == "ok":
                shares = " | ".join(f"{r['share'].get(g, 0):.0%}" for g in groups)
                lines.append(f"| {layout_label(r['layout'])} | {r['wall_ms']:.1f} | {shares} | {r['bmm_gflops']:.0f} "
                             f"({100 * r['bmm_gflops'] / report['matmul_gflops']:.0f}%) |")
    lines += ["", "### One model step (ViT-tiny on a 7×7 grid, forward + backward + AdamW)", "",
              "| attention | ms: median (min) | peak MiB: tensors / RSS |", "|---|---|---|"]
    for r in report["models"]:
        lines.append(f"| {KIND_NAMES[r['kind']]} | {_cell_time(r)} | {_cell_mem(r)} |")
    if report["sweep"]:
        lines += ["", "### Pair-chunk budget (full Translution, one layer)", "",
                  "| layout | budget MiB | ms: median (min) | peak MiB: tensors / RSS | GFLOP/s counted (%) |",
                  "|---|---|---|---|---|"]
        for r in report["sweep"]:
            lines.append(f"| {layout_label(r['layout'])} | {r['budget'] >> 20} | {_cell_time(r)} | {_cell_mem(r)} | "
                         f"{_cell_rate(r)} |")
    timed = [r for r in report["layers"] + report["models"] + report["sweep"] if r["status"] == "ok"]
    disturbed = [r for r in timed if not r["quiet"]]
    lines += ["", f"Times are over iterations during which other processes used < {QUIET_CORES} cores "
                  f"({sum(r['quiet_iterations'] for r in timed)} of {sum(r['iterations'] for r in timed)} iterations)."
              + (f" **† {len(disturbed)} configurations found too few quiet iterations; their times are disturbed.**"
                 if disturbed else "")]
    return "\n".join(lines)


def write_docs(path: Path, text: str, report: dict, markers: tuple[str, str] = (DOCS_BEGIN, DOCS_END)) -> None:
    """Replace the generated section of ``path`` (between ``markers``), keeping the prose around it."""
    begin, end = markers
    block = f"{begin}\n{text}\n\n<details><summary>raw figures (JSON)</summary>\n\n```json\n" \
            f"{json.dumps(report, indent=1)}\n```\n</details>\n{end}"
    old = path.read_text() if path.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in old:
        old = old.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = old.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + block + tail)


if __name__ == "__main__":
    main()
