"""Compile time and steady step time of ``torch.compile`` (``train.compile``) against eager.

For each case, an eager copy and a compiled copy with the same weights run forward + backward
on the same batch: the compiled copy's first step (tracing, AOTAutograd, Inductor) is the
compile time; then both take turns for ``--steps`` steps and the medians are compared. A
layer is compiled whole; a model per block (:func:`parallelism.compile.apply_compile`, what
the trainer does). ``--mode reduce-overhead`` records CUDA graphs (GPU only).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py           # table and JSON (a few minutes on CPU)
    python benchmarks/bench_compile.py --quick                     # tiny sizes
    python benchmarks/bench_compile.py --device cuda --mode reduce-overhead
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from parallelism.compile import COMPILE_MODES, apply_compile  # noqa: E402
from translution_dist.models import ModelConfig, build_model  # noqa: E402
from translution_dist.models.attention import AlphaTranslutionAttention, TranslutionAttention  # noqa: E402
from translution_dist.ops import ImageGridLayout  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_compile.json"


def _layer_case(kind: str, grid: int, dim: int, batch: int, device: torch.device):
    layout = ImageGridLayout(grid, grid)
    heads, dim_head = 2, dim // 2
    layer = (TranslutionAttention(layout, dim, heads, dim_head) if kind == "translution"
             else AlphaTranslutionAttention(layout, dim, heads, dim_head, rank=8))
    x = torch.randn(batch, layout.max_tokens, dim, device=device)
    return layer, (lambda m, x=x: m(x).square().mean()), "whole layer"


def _vit_case(kind: str, grid: int, dim: int, batch: int, device: torch.device):
    cfg = ModelConfig(arch="vit", attention=kind, dim=dim, depth=2, heads=2, dim_head=dim // 2, mlp_dim=2 * dim,
                      alpha_rank=8, image_size=4 * grid, patch_size=4, channels=1, num_classes=10)
    images = torch.randn(batch, 1, 4 * grid, 4 * grid, device=device)
    labels = torch.randint(10, (batch,), device=device)
    return build_model(cfg), (lambda m: torch.nn.functional.cross_entropy(m(images), labels)), "per block"


def cases(quick: bool, device: torch.device) -> dict:
    grid, dim, batch = (3, 16, 2) if quick else (7, 64, 4)
    return {
        f"Translution layer {grid}×{grid}, C={dim}, B={batch}": _layer_case("translution", grid, dim, batch, device),
        f"α-Translution layer {grid}×{grid}, C={dim}, B={batch}": _layer_case("alpha", grid, dim, batch, device),
        f"ViT depth 2, Translution {grid}×{grid}, C={dim}, B={batch}": _vit_case("translution", grid, dim, batch, device),
        f"ViT depth 2, α-Translution {grid}×{grid}, C={dim}, B={batch}": _vit_case("alpha", grid, dim, batch, device),
    }


def _step(model: torch.nn.Module, loss_fn, device: torch.device) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model: torch.nn.Module, loss_fn, how: str, mode: str, steps: int, device: torch.device) -> dict:
    model = model.to(device)
    compiled = copy.deepcopy(model)
    if how == "whole layer":
        compiled.compile(**({} if mode == "default" else {"mode": mode}))
    else:
        apply_compile(compiled, mode)
    _step(model, loss_fn, device)  # eager warm-up (plans, allocator)
    compile_s = _step(compiled, loss_fn, device)
    eager, fast = [], []
    for _ in range(steps):  # take turns, so that a busy neighbour slows both alike
        eager.append(_step(model, loss_fn, device))
        fast.append(_step(compiled, loss_fn, device))
    eager_s, compiled_s = statistics.median(eager), statistics.median(fast)
    return {"compile": how, "first_compiled_step_s": compile_s, "eager_step_s": eager_s,
            "compiled_step_s": compiled_s, "speedup": eager_s / compiled_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--steps", type=int, default=5, help="steady steps per copy")
    parser.add_argument("--mode", choices=COMPILE_MODES, default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = {}
    print(f"{'case':52} {'compile':>11} {'first step':>11} {'eager':>9} {'compiled':>9} {'speed-up':>8}")
    for name, (model, loss_fn, how) in cases(args.quick, device).items():
        row = rows[name] = measure(model, loss_fn, how, args.mode, args.steps, device)
        print(f"{name:52} {how:>11} {row['first_compiled_step_s']:>10.1f}s {row['eager_step_s'] * 1e3:>7.1f}ms "
              f"{row['compiled_step_s'] * 1e3:>7.1f}ms {row['speedup']:>7.2f}×")
    report = {"command": " ".join(sys.argv), "device": str(device), "mode": args.mode, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date": datetime.datetime.now(datetime.UTC).isoformat(),
              "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
