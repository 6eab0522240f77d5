"""``translution plan CONFIG --calibrate OUT.yaml``: this machine's figures for the step-time model.

Runs ``procs`` CPU processes at once (one torch thread each, gloo over loopback), as a CPU
training run of that many processes would, so that each figure is what one process gets
while the others compete for the same cores. Each process measures, for a few seconds:

* **matmul rate** — fp32 ``1024³`` matmuls, the best repeat: the per-process peak;
* **kernels** — one attention layer of the config's model (norm, projections, the pair
  kernels, softmax, ``out_proj``) forward + backward at the config's micro-batch: its
  executed FLOPs over its time, as a fraction of the peak (``kernel_efficiency``);
* **dense layers** — the config's feed-forward block the same way (``matmul_efficiency``);
* **AdamW** — the trainer's step (gradient-norm clipping, foreach AdamW) over 4 M parameters;
* **host copies** — a 64 MiB tensor copy (what CPU "offload" copies cost);
* **gloo** — all-reduces of 16 MiB (bandwidth: bytes a ring sends per process over the time)
  and of one element (latency: time over the ring's ``2(k−1)`` steps); an all-gather and a
  reduce-scatter of 16 MiB, as fractions of that bandwidth (gloo emulates both).

The medians over processes go to a cluster YAML (``nodes: 1``, ``procs_per_node: procs``,
``hardware:`` with every figure), which ``plan`` uses as ``cluster=OUT.yaml``. Loopback
serves as both the intra- and the inter-node link.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from training.hardware import MATMUL_SIZE, best_seconds, measured_matmul_flops
from translution_dist.models import ModelConfig
from translution_dist.models.blocks import FeedForward, make_attention
from translution_dist.models.flops import flop_terms

ADAM_PARAMS = 4 << 20
COPY_BYTES = 64 << 20
ALL_REDUCE_BYTES = 16 << 20


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layer_flops(model: ModelConfig, names: set[str] | None, exclude: set[str]) -> float:
    """Executed FLOPs of one block's terms per sample (``names``: only these; ``exclude``: not these)."""
    depth = model.dims.depth
    return sum(t.executed / depth for t in flop_terms(model)
               if t.split != "root" and (names is None or t.name in names) and t.name not in exclude)


def _compute_figures(model: ModelConfig, batch: int, budget_s: float) -> dict[str, float]:
    d = model.dims
    peak = measured_matmul_flops(torch.device("cpu"), torch.float32, budget_s)

    torch.manual_seed(0)
    tokens = model.layout().max_tokens
    attn = make_attention(model, model.layout(), causal=model.arch == "gpt")
    ff = FeedForward(d.dim, d.mlp_dim)
    x = torch.randn(batch, tokens, d.dim, requires_grad=True)

    def step(module: torch.nn.Module) -> None:
        module(x).sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    attn_s = _median_seconds(lambda: step(attn), max(3, int(budget_s / 0.2)))
    ff_s = _median_seconds(lambda: step(ff), 10)
    attention_flops = batch * _layer_flops(model, None, {"feed-forward"})
    ff_flops = batch * _layer_flops(model, {"feed-forward"}, set())

    params = [torch.nn.Parameter(torch.randn(ADAM_PARAMS // 4)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def adam() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    adam_s = _median_seconds(adam, 5)
    src = torch.empty(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    copy_s = best_seconds(lambda: dst.copy_(src), budget_s / 4)
    return {"peak_flops": peak, "kernel_efficiency": attention_flops / attn_s / peak,
            "matmul_efficiency": ff_flops / ff_s / peak, "cpu_adam_params_per_s": ADAM_PARAMS / adam_s,
            "pcie_bandwidth": COPY_BYTES / copy_s}


def _link_figures(world: int) -> dict[str, float]:
    """All-reduce bandwidth (ring bytes per second) and latency; all-gather and reduce-scatter of the
    same payload as fractions of that bandwidth."""
    if world == 1:
        return {"bandwidth": float("inf"), "latency": 0.0, "all_gather": 1.0, "reduce_scatter": 1.0}
    big = torch.ones(ALL_REDUCE_BYTES // 4)
    shard = torch.ones(ALL_REDUCE_BYTES // 4 // world)
    small = torch.ones(1)
    ring = 2 * (world - 1)
    big_s = _median_seconds(lambda: dist.all_reduce(big), 5)
    gather_s = _median_seconds(lambda: dist.all_gather_into_tensor(big, shard), 5)
    scatter_s = _median_seconds(lambda: dist.reduce_scatter_tensor(shard, big), 5)
    small_s = _median_seconds(lambda: dist.all_reduce(small), 50)
    bandwidth = ring / world * ALL_REDUCE_BYTES / big_s
    half = (world - 1) / world * ALL_REDUCE_BYTES  # what a ring all-gather or reduce-scatter sends
    return {"bandwidth": bandwidth, "latency": small_s / ring,
            "all_gather": half / gather_s / bandwidth, "reduce_scatter": half / scatter_s / bandwidth}


def _worker(rank: int, world: int, port: int, out_dir: str, model_json: str, batch: int, budget_s: float) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=300))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    model = ModelConfig.model_validate_json(model_json)
    dist.barrier()
    figures = _compute_figures(model, batch, budget_s)  # all processes at once: they share the cores
    dist.barrier()
    figures.update(_link_figures(world))
    dist.barrier()
    dist.destroy_process_group()
    torch.save(figures, Path(out_dir) / f"rank{rank}.pt")


def measure(model: ModelConfig, batch: int, procs: int, budget_s: float = 2.0) -> dict[str, float]:
    """The medians over ``procs`` concurrent processes of every figure (see the module docstring)."""
    store = dist.TCPStore("127.0.0.1", 0, procs + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=300))
    with tempfile.TemporaryDirectory() as out_dir:
        env = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            torch.multiprocessing.start_processes(
                _worker, args=(procs, store.port, out_dir, model.model_dump_json(), batch, budget_s),
                nprocs=procs, start_method="spawn")
        finally:
            if env is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = env
        ranks = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(procs)]
    return {key: statistics.median(r[key] for r in ranks) for key in ranks[0]}


def cluster_yaml(figures: dict[str, float], procs: int, batch: int) -> dict[str, Any]:
    """A ``cluster`` section for this machine with the measured ``hardware``."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    hardware: dict[str, Any] = {
        "preset": "nominal",
        "name": f"this machine, {procs} CPU process(es) × 1 thread, calibrated {date} (batch {batch})",
        "peak_flops": float(f"{figures['peak_flops']:.4g}"),
        "matmul_efficiency": round(min(1.0, figures["matmul_efficiency"]), 3),
        "kernel_efficiency": round(min(1.0, figures["kernel_efficiency"]), 3),
        "pcie_bandwidth": float(f"{figures['pcie_bandwidth']:.4g}"),
        "cpu_adam_params_per_s": float(f"{figures['cpu_adam_params_per_s']:.4g}"),
    }
    if procs > 1:
        for where in ("intra_node", "inter_node"):
            hardware[f"{where}_bandwidth"] = float(f"{figures['bandwidth']:.4g}")
            hardware[f"{where}_latency"] = float(f"{figures['latency']:.4g}")
        hardware["all_gather_efficiency"] = round(figures["all_gather"], 3)
        hardware["reduce_scatter_efficiency"] = round(figures["reduce_scatter"], 3)
    return {"nodes": 1, "procs_per_node": procs, "cpu_memory": f"{pages >> 30}GiB", "hardware": hardware}


def describe(figures: dict[str, float], procs: int) -> str:
    lines = [f"calibrated with {procs} concurrent process(es), 1 thread each:",
             f"  matmul (fp32 {MATMUL_SIZE}³)      {figures['peak_flops'] / 1e9:8.1f} GFLOP/s per process",
             f"  attention layer (kernels)  {figures['kernel_efficiency']:8.1%} of it (executed FLOPs)",
             f"  feed-forward (dense)       {figures['matmul_efficiency']:8.1%} of it",
             f"  AdamW + clipping           {figures['cpu_adam_params_per_s'] / 1e6:8.1f} M params/s",
             f"  host copy                  {figures['pcie_bandwidth'] / 1e9:8.2f} GB/s"]
    if procs > 1:
        lines += [f"  gloo all-reduce            {figures['bandwidth'] / 1e9:8.2f} GB/s per process (ring), "
                  f"{figures['latency'] * 1e6:.0f} µs per ring step; all-gather at "
                  f"{figures['all_gather']:.0%} of that, reduce-scatter at {figures['reduce_scatter']:.0%}"]
    return "\n".join(lines)


def write(path: Path, section: dict[str, Any]) -> None:
    header = ("# Written by `translution plan CONFIG --calibrate`: measured figures of this machine for the\n"
              "# step-time model (launcher/step_time.py). Use as `cluster=THIS_FILE`.\n")
    path.write_text(header + yaml.safe_dump(section, sort_keys=False, allow_unicode=True))
