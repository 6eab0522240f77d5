"""The analytic memory model against what PyTorch actually keeps.

* Saved activations: the per-block and whole-model formulas against the bytes autograd saves
  (``saved_tensors_hooks``, parameters excluded), for every attention kind, ViT and GPT, fp32
  and bf16 autocast. Exact up to a few scalars.
* Peaks (slow): real ``translution train`` runs under ``helpers.memory_measure`` (torchrun, gloo,
  CPU), one process and FSDP2 on 2 ranks with bank_chunks 1 and 4, CPU offload, gradient
  accumulation, head and displacement parallelism, and DeepSpeed ZeRO-3 with its optimizer on
  the CPU, against :func:`launcher.memory_model.estimate`. Target: within
  10%; the table is printed (``pytest -s``) and recorded in ``docs/scale.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers.memory_measure import LiveTensorBytes
from launcher.memory_model import (
    Precision,
    RunShape,
    _shapes,
    autocast_weight_bytes,
    block_activation_bytes,
    estimate,
    feed_forward_bytes,
    model_census,
    root_activation_bytes,
)
from parallelism.activation_checkpoint import apply_activation_checkpoint
from parallelism.config import ParallelConfig
from training.config import load_config
from translution_dist.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.10


def _saved_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


VARIANTS = [
    ("gpt", "translution", {}), ("gpt", "translution", {"relative": "kv"}), ("gpt", "alpha", {}),
    ("gpt", "self_attention", {"position": "none"}), ("vit", "translution", {}),
    ("vit", "translution", {"relative": "v"}), ("vit", "alpha", {}), ("vit", "self_attention", {}),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("arch", "attention", "extra"), VARIANTS,
                         ids=[f"{a}-{b}-{''.join(c.values()) or 'qkv'}" for a, b, c in VARIANTS])
def test_saved_activations_match_the_formulas(arch, attention, extra, precision):
    shape = dict(context_length=32, vocab_size=50) if arch == "gpt" else dict(
        image_size=24, patch_size=4, channels=1, num_classes=10)
    cfg = ModelConfig(arch=arch, attention=attention, dim=24, depth=2, heads=3, dim_head=8, mlp_dim=40, alpha_rank=2,
                      bank_chunks=1 if attention == "self_attention" else 2, **shape, **extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch, tokens = 3, cfg.layout().max_tokens
    x = torch.randint(50, (batch, tokens)) if arch == "gpt" else torch.randn(batch, 1, 24, 24)
    y = torch.randint(50, (batch, tokens)) if arch == "gpt" else torch.randint(10, (batch,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    layout = ParallelConfig(engine="none")
    p = Precision.of(precision, "fp32", "cpu")
    s = _shapes(cfg, layout, batch)

    def step() -> None:  # as the trainer: forward and loss under autocast
        with autocast:
            logits = model(x)
            F.cross_entropy(logits.flatten(0, 1), y.flatten()) if arch == "gpt" else F.cross_entropy(logits, y)

    block = model.encoder.blocks[0]
    h = torch.randn(batch, tokens, 24, requires_grad=True)

    def block_step() -> None:
        with autocast:
            block(h)

    casts = autocast_weight_bytes(model_census(cfg), layout, p)
    block_casts = casts and 2 * sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    assert _saved_bytes(block, block_step) == block_activation_bytes(cfg, layout, s, p) + block_casts
    expected = cfg.dims.depth * block_activation_bytes(cfg, layout, s, p) + root_activation_bytes(cfg, s, p) + casts
    measured = _saved_bytes(model, step)
    assert abs(measured - expected) <= 512, (measured, expected)  # scalars: loss weights, position ids


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["block", "selective"])
@pytest.mark.parametrize(("arch", "attention"), [("gpt", "translution"), ("vit", "alpha")])
def test_recomputation_keeps_what_the_model_says(arch, attention, mode, precision):
    """Live tensor bytes after one block's forward: the saving of each recomputation mode is the
    model's ``per_block − kept_per_block`` (the block's output and autocast's weight copies cancel)."""
    shape = dict(context_length=32, vocab_size=50) if arch == "gpt" else dict(
        image_size=24, patch_size=4, channels=1, num_classes=10)
    cfg = ModelConfig(arch=arch, attention=attention, dim=24, depth=2, heads=3, dim_head=8, mlp_dim=40, alpha_rank=2,
                      bank_chunks=2, **shape)
    batch, tokens = 3, cfg.layout().max_tokens
    h = torch.randn(batch, tokens, 24, requires_grad=True)
    kept = {}
    for recompute in ("none", mode):
        torch.manual_seed(0)
        block = apply_activation_checkpoint(build_model(cfg), recompute).encoder.blocks[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), LiveTensorBytes() as live:
            out = block(h)
            kept[recompute] = live.live
        out.sum().backward()
    layout = ParallelConfig(engine="none")
    p = Precision.of(precision, "fp32", "cpu")
    s = _shapes(cfg, layout, batch)
    run = RunShape(cfg, batch, precision, "cpu", activation_checkpoint=mode)
    acts = estimate(run, layout).activations
    assert acts.per_block == block_activation_bytes(cfg, layout, s, p)
    assert acts.recomputed == (acts.per_block if mode == "block" else feed_forward_bytes(s, p))
    assert kept["none"] - kept[mode] == acts.per_block - acts.kept_per_block


# -- measured peaks ---------------------------------------------------------------------------------

BANK_HEAVY = {  # parameters, gradients and AdamW states dominate; the per-pair scratch is visible
    "model": {"arch": "gpt", "attention": "translution", "dim": 96, "depth": 3, "heads": 4, "dim_head": 24,
              "mlp_dim": 384, "context_length": 96, "vocab_size": 256, "bank_chunks": 1},
    "data": {"kind": "synthetic", "synthetic": {"task": "text", "samples": 256, "samples_per_shard": 32,
                                                "context_length": 96, "vocab_size": 256}},
    "train": {"micro_batch_size": 4},
}
ACTIVATION_HEAVY = {  # 32 heads of width 2: the dense B·h·N² probabilities dominate
    "model": {"arch": "gpt", "attention": "translution", "dim": 32, "depth": 4, "heads": 32, "dim_head": 2,
              "mlp_dim": 64, "context_length": 128, "vocab_size": 64, "bank_chunks": 2},
    "data": {"kind": "synthetic", "synthetic": {"task": "text", "samples": 256, "samples_per_shard": 32,
                                                "context_length": 128, "vocab_size": 64}},
    "train": {"micro_batch_size": 16},
}
CASES = {  # name: (base, processes, overrides)
    "1 process": (BANK_HEAVY, 1, ["parallel.engine=none"]),
    "FSDP2 ×2, bank_chunks=1": (BANK_HEAVY, 2, ["parallel.engine=fsdp"]),
    "FSDP2 ×2, bank_chunks=4": (BANK_HEAVY, 2, ["parallel.engine=fsdp", "model.bank_chunks=4"]),
    "FSDP2 ×2, bank_chunks=4, cpu_offload": (BANK_HEAVY, 2, ["parallel.engine=fsdp", "model.bank_chunks=4",
                                                             "parallel.cpu_offload=true"]),
    "FSDP2 ×2, bank_chunks=4, grad_accum=2": (BANK_HEAVY, 2, ["parallel.engine=fsdp", "model.bank_chunks=4",
                                                              "train.grad_accum=2"]),
    "FSDP2 ×2, tp=2": (BANK_HEAVY, 2, ["parallel.engine=fsdp", "parallel.tp=2"]),
    "FSDP2 ×2, activation-heavy": (ACTIVATION_HEAVY, 2, ["parallel.engine=fsdp"]),
    "FSDP2 ×2, activation-heavy, dispp=2": (ACTIVATION_HEAVY, 2, ["parallel.engine=fsdp", "parallel.dispp=2"]),
    "DeepSpeed ZeRO-3 ×2, optimizer on CPU": (BANK_HEAVY, 2, ["parallel.engine=deepspeed",
                                                              "parallel.offload_optimizer=cpu"]),
}


def _measure(config: Path, procs: int, overrides: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    entry = ["-m", "helpers.memory_measure", str(out), str(config), *overrides]
    if procs == 1:
        argv = [sys.executable, *entry]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(procs), *entry]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(procs)]


def _compare_peaks(cases: dict, tmp_path: Path) -> None:
    """Measure every case, print the table, and hold each estimate to ``TOLERANCE`` of its measured peak."""
    rows = []
    for name, (base, procs, overrides) in cases.items():
        config = tmp_path / f"{len(rows)}.yaml"
        config.write_text(yaml.safe_dump({
            "run": {"name": f"case{len(rows)}", "output_dir": str(tmp_path / "runs")}, **base,
            "train": {**base["train"], "steps": 3, "log_every": 1, "eval_batches": 0, "resume": "never"},
            "optim": {"warmup_steps": 0}, "tracking": {"enabled": False}}))
        ranks = _measure(config, procs, overrides, tmp_path / f"out{len(rows)}")
        cfg = load_config(config, overrides)
        est = estimate(RunShape(cfg.model, cfg.train.micro_batch_size, cfg.train.precision, "cpu",
                                cfg.train.grad_accum, cfg.train.activation_checkpoint), cfg.parallel.resolve(procs))
        measured = max(r["steady_peak_bytes"] for r in ranks)
        rss = max(r["rss_peak_bytes"] - r["rss_before_bytes"] for r in ranks)
        rows.append((name, est.peak_total, measured, rss, max(r["steps"][-1]["at_op"] for r in ranks)))
    table = ["| layout | model (MiB) | measured peak (MiB) | model/measured | peak RSS − baseline (MiB) | peak at |",
             "|---|---:|---:|---:|---:|---|"]
    table += [f"| {name} | {model / 2**20:.1f} | {measured / 2**20:.1f} | {model / measured:.3f} | {rss / 2**20:.1f} "
              f"| `{op}` |" for name, model, measured, rss, op in rows]
    print("\n" + "\n".join(table))
    for name, model, measured, _, _ in rows:
        assert abs(model - measured) <= TOLERANCE * measured, f"{name}: model {model:,} B, measured {measured:,} B"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_model_matches_measured_peaks(tmp_path):
    _compare_peaks(CASES, tmp_path)


RECOMPUTE_CASES = {
    f"{layout}, activation-heavy, activation_checkpoint={mode}": (ACTIVATION_HEAVY, procs,
                                                                  [*overrides, f"train.activation_checkpoint={mode}"])
    for layout, procs, overrides in (("1 process", 1, ["parallel.engine=none"]),
                                     ("FSDP2 ×2, dispp=2", 2, ["parallel.engine=fsdp", "parallel.dispp=2"]))
    for mode in ("none", "block", "selective")
}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_model_matches_measured_peaks_with_recomputation(tmp_path):
    _compare_peaks(RECOMPUTE_CASES, tmp_path)
