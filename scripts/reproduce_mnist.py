"""Reproduce the paper's Static/Dynamic MNIST comparison at small scale on CPU.

Trains each attention kind on Static and on Dynamic MNIST with the same budget, then
evaluates Static→Static, Dynamic→Dynamic and Static→Dynamic (trained on centred digits,
tested on digits anywhere in the canvas) and writes the table to ``docs/results.md`` beside
the paper's figures. Every training is a real ``translution train`` run tracked in MLflow.

    python scripts/reproduce_mnist.py --steps 300 --kinds self_attention alpha translution
    python scripts/reproduce_mnist.py --kinds acmix shift_structure uniformer mixformer  # the mixers

Every kind has its model in ``configs/models/mnist_vit_<kind>.yaml``; the mixers
(docs/models.md) have no paper figure. ``--docs`` names where the table goes (a dry run:
``--steps 1 --train-samples 64 --docs /tmp/x``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.config import load_config
from training.tasks import ClassificationTask
from translution_dist.data.loader import build_dataloader
from translution_dist.models import build_model
from translution_dist.models.config import MIXERS

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # Static→Static, Dynamic→Dynamic, Static→Dynamic top-1 (%), from the paper
    "self_attention": (98.48, 92.64, 18.18),
    "alpha": (98.48, 97.31, 34.90),
    "translution": (98.60, 97.35, 36.40),
}
NAMES = {"self_attention": "Self-attention", "alpha": "α-Translution", "translution": "Translution",
         "acmix": "ACmix", "shift_structure": "Shift-matrix structure embedding", "uniformer": "UniFormer",
         "mixformer": "MixFormer"}
KINDS = [*PAPER, *MIXERS]
NOTES = "<!-- notes: written by hand, kept when the table above is regenerated -->"


def build_data(root: Path, mode: str, train_samples: int) -> Path:
    out = root / f"mnist-{mode}"
    if not (out / "index.json").exists():
        subprocess.run([sys.executable, "-m", "launcher.cli", "data", "mnist", str(out), "--mode", mode,
                        "--train-samples", str(train_samples)], check=True, cwd=ROOT)
    return out


def train(kind: str, mode: str, data: Path, args: argparse.Namespace) -> Path:
    name = f"mnist-{mode}-{kind}"
    overrides = [f"run.name={name}", f"run.output_dir={args.out}", f"model=configs/models/mnist_vit_{kind}.yaml",
                 f"data.path={data}", f"train.steps={args.steps}", f"train.micro_batch_size={args.batch}",
                 "train.eval_batches=0", "train.checkpoint_every=0", "parallel.engine=none",
                 "tracking.experiment=reproduce-mnist", f"optim.lr={args.lr}", f"optim.warmup_steps={args.steps // 10}"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launcher.cli", "train", "configs/quickstart.yaml", *overrides], check=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(f"[reproduce] trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return args.out / name


@torch.no_grad()
def top1(run_dir: Path, test_data: Path) -> float:
    """Top-1 accuracy (%) of a run's final model on another data set's test split."""
    cfg = load_config(run_dir / "config.yaml", [f"data.path={test_data}"])
    model = build_model(cfg.model)
    model.load_state_dict(load_file(run_dir / "artifacts" / "model.safetensors"))
    model.eval()
    loader, _ = build_dataloader(cfg.data, split="test", dp_rank=0, dp_size=1, batch_size=256, seed=0)
    task = ClassificationTask()
    sums = {"top1": 0.0, "count": 0.0, "top5": 0.0, "loss_sum": 0.0}
    for batch in loader:
        for key, value in task.eval_sums(model, batch).items():
            sums[key] += value
    return 100 * sums["top1"] / sums["count"]


def write_table(results: dict[str, tuple[float, float, float]], args: argparse.Namespace, seconds: float) -> None:
    def paper(kind: str) -> str:
        return " / ".join(f"{a:.2f}" for a in PAPER[kind]) if kind in PAPER else "—"

    rows = "\n".join(f"| {NAMES[k]} | {r[0]:.2f} / {r[1]:.2f} / {r[2]:.2f} | {paper(k)} |" for k, r in results.items())
    text = f"""# Static and Dynamic MNIST at small scale

Top-1 accuracy (%) as Static→Static / Dynamic→Dynamic / Static→Dynamic (trained on centred
digits, tested on digits placed anywhere in the 84×84 canvas).

| attention | this project (CPU, small budget) | paper |
|---|---|---|
{rows}

Setup: ViT tiny (192 wide, 6 layers, 3 heads), 84×84 grayscale, patch 12 (7×7 grid), each model
{args.steps} AdamW steps of batch {args.batch} (lr {args.lr}, 10% warm-up, cosine), one process. Digits:
the offline stand-in built by `translution data mnist` from scikit-learn's 8×8 digits upscaled
to 28×28 (1,497 training / 300 test digits; see the data card), {args.train_samples} training
placements per data set — not the real MNIST, so absolute accuracies are not comparable with
the paper; the ordering across attention kinds and the Static→Dynamic gap are what to compare.

Command: `python scripts/reproduce_mnist.py {' '.join(sys.argv[1:])}` on {platform.processor() or platform.machine()},
{os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today()}; {seconds / 60:.0f} minutes in all.
Raw figures: `docs/results.json`.
"""
    out = args.docs / "results.md"
    previous = out.read_text() if out.exists() else ""
    notes = previous[previous.index(NOTES):] if NOTES in previous else f"{NOTES}\n"
    out.write_text(text + "\n" + notes)
    (args.docs / "results.json").write_text(json.dumps(
        {"results": results, "paper": PAPER, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(PAPER), choices=KINDS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where results.md and results.json go")
    args = parser.parse_args()
    started = time.perf_counter()
    data = {mode: build_data(args.data, mode, args.train_samples) for mode in ("static", "dynamic")}
    results = {}
    for kind in args.kinds:
        static_run = train(kind, "static", data["static"], args)
        dynamic_run = train(kind, "dynamic", data["dynamic"], args)
        results[kind] = (top1(static_run, data["static"]), top1(dynamic_run, data["dynamic"]),
                         top1(static_run, data["dynamic"]))
        print(f"[reproduce] {kind}: {results[kind]}", flush=True)
    write_table(results, args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
