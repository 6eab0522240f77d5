"""Memory and time of activation recomputation (``train.activation_checkpoint``) per mode.

For each model, three copies with the same weights (``none``, ``block``, ``selective``) run
forward + backward on the same batch (the optimizer step is the same in every mode and is left out):

* peak tensor memory — the profiler's allocation events replayed, as in ``bench_ops.py``: the
  increase over the state after ``zero_grad`` (activations, the gradients produced, the
  kernels' working memory), beside the planner's figure for it (``launcher.memory_model``: the
  larger of its two backward phases, all activations at the start or all gradients at the end);
* time — the modes take turns, step by step, so that a busy neighbour on a shared machine
  slows all of them alike; only steps during which other processes used less than
  ``bench_ops.QUIET_CORES`` cores count (all steps if too few were quiet, marked disturbed).

Compare the modes as ratios to ``none`` within one run. Where the banks' gradients dominate
(full Translution on short sequences) recomputation saves little; it pays where activations
grow with B·N (long sequences, large batches, α-Translution and its small banks).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_recompute.py          # table and JSON (~10 min)
    python benchmarks/bench_recompute.py --quick                    # seconds: tiny models
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import bench_ops  # noqa: E402  (benchmarks/ is the script's directory)

from launcher.memory_model import RunShape, estimate  # noqa: E402
from parallelism.activation_checkpoint import MODES, apply_activation_checkpoint  # noqa: E402
from parallelism.config import ParallelConfig  # noqa: E402
from translution_dist.models import ModelConfig, build_model  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_recompute.json"
VIT_7X7 = dict(arch="vit", preset="tiny", image_size=84, patch_size=12, channels=1, num_classes=10)
GPT_160 = dict(arch="gpt", preset="tiny", context_length=160, vocab_size=256)
MODELS = {  # name: (model fields, batch); the paper's tiny widths: 192, 6 blocks, 3 heads × 64, MLP 768
    "ViT-tiny 7×7, Translution": ({**VIT_7X7, "attention": "translution"}, 8),
    "ViT-tiny 7×7, α-Translution": ({**VIT_7X7, "attention": "alpha"}, 32),
    "GPT-tiny T=160, Translution": ({**GPT_160, "attention": "translution"}, 8),
}
QUICK_MODELS = {
    "tiny ViT 3×3, Translution": (dict(arch="vit", attention="translution", dim=16, depth=2, heads=2, dim_head=8,
                                       mlp_dim=32, image_size=6, patch_size=2, channels=1, num_classes=5), 2),
}


def _batch(cfg: ModelConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if cfg.arch == "vit":
        return (torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=generator),
                torch.randint(cfg.num_classes, (batch,), generator=generator))
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.context_length + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _forward_backward(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    inputs, targets = batch

    def clear() -> None:
        model.zero_grad(set_to_none=True)

    def step() -> None:
        clear()
        logits = model(inputs)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()

    step()  # the kernels' pair plans exist from here on
    return step, clear


def _timed(step) -> tuple[float, float]:
    """Seconds of one ``step()`` and the cores other processes kept busy meanwhile."""
    busy0, own0, t0 = bench_ops._machine_busy_seconds(), bench_ops._own_cpu_seconds(), time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    other = ((bench_ops._machine_busy_seconds() - busy0) - (bench_ops._own_cpu_seconds() - own0)) / dt
    return dt, max(0.0, other)


def planned_backward_peak(cfg: ModelConfig, batch: int, mode: str) -> int:
    """The planner's peak of forward + backward above the persistent terms (one process, fp32, CPU)."""
    est = estimate(RunShape(cfg, batch, "fp32", "cpu", activation_checkpoint=mode), ParallelConfig(engine="none"))
    return max(phase.at("device") + phase.at("host") for phase in est.phases if phase.name != "optimizer step")


def measure_model(fields: dict, batch: int, min_quiet: int, patience_s: float) -> dict:
    cfg = ModelConfig(**fields)
    torch.manual_seed(0)
    base = build_model(cfg)
    data = _batch(cfg, batch)
    steps = {mode: _forward_backward(apply_activation_checkpoint(copy.deepcopy(base), mode), data) for mode in MODES}
    rows = {}
    for mode, (step, clear) in steps.items():
        rows[mode] = dict(peak_tensor_mib=bench_ops.peak_tensor_increase(step, clear) / 2**20,
                          planned_peak_mib=planned_backward_peak(cfg, batch, mode) / 2**20, samples=[])
    start = time.perf_counter()
    while True:  # modes take turns
        for mode, (step, _) in steps.items():
            rows[mode]["samples"].append(_timed(step))
        quiet = min(sum(o < bench_ops.QUIET_CORES for _, o in rows[m]["samples"]) for m in MODES)
        if quiet >= min_quiet or time.perf_counter() - start > patience_s:
            break
    undisturbed = quiet >= min_quiet
    for row in rows.values():
        samples = row.pop("samples")
        times = sorted(t for t, o in samples if o < bench_ops.QUIET_CORES or not undisturbed)
        row.update(ms_median=times[len(times) // 2] * 1e3, ms_min=times[0] * 1e3, iterations=len(samples),
                   counted=len(times), quiet=undisturbed)
    for row in rows.values():
        row["time_ratio"] = row["ms_median"] / rows["none"]["ms_median"]
        row["memory_ratio"] = row["peak_tensor_mib"] / rows["none"]["peak_tensor_mib"]
        row["saved_mib"] = rows["none"]["peak_tensor_mib"] - row["peak_tensor_mib"]
        row["planned_saved_mib"] = rows["none"]["planned_peak_mib"] - row["planned_peak_mib"]
    return dict(model=fields, batch=batch, modes=rows)


def render(report: dict) -> str:
    lines = ["| model (batch) | mode | peak tensor MiB: measured (× none) / planner | saved MiB: measured / planner | "
             "forward + backward ms: median (min) | time × none |", "|---|---|---|---|---|---|"]
    for name, result in report["models"].items():
        for mode, row in result["modes"].items():
            flag = "" if row["quiet"] else " †"
            lines.append(f"| {name} ({result['batch']}) | {mode} | {row['peak_tensor_mib']:.1f} "
                         f"({row['memory_ratio']:.2f}) / {row['planned_peak_mib']:.1f} | "
                         f"{row['saved_mib']:.1f} / {row['planned_saved_mib']:.1f} | "
                         f"{row['ms_median']:.1f} ({row['ms_min']:.1f}){flag} | {row['time_ratio']:.2f} |")
    lines.append("")
    lines.append(f"fp32, {report['machine']['torch_threads']} torch thread(s); † disturbed: too few steps with other "
                 f"processes below {bench_ops.QUIET_CORES} cores, all steps counted.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args()
    models = QUICK_MODELS if args.quick else MODELS
    started = time.time()
    results = {}
    for name, (fields, batch) in models.items():
        results[name] = measure_model(fields, batch, min_quiet=2 if args.quick else 5,
                                      patience_s=5.0 if args.quick else 150.0)
        print(f"{name}: " + ", ".join(f"{m} {r['ms_median']:.0f} ms {r['peak_tensor_mib']:.1f} MiB"
                                      for m, r in results[name]["modes"].items()), flush=True)
    report = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  command="python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"), machine=bench_ops.machine(),
                  seconds=time.time() - started, models=results)
    print("\n" + render(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
