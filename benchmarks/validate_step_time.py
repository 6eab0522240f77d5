"""Predicted against measured step time for the layouts of ``bench_parallel.py``, at 1, 2 and 4 processes.

For each layout: calibrate this machine with as many concurrent processes as the layout has
(``launcher.calibrate.measure``: the per-process matmul rate, the attention layer's and the
feed-forward's achieved rates at the layout's per-rank micro-batch, AdamW, host copies, gloo) just before
and just after measuring the layout with ``bench_parallel``'s own worker (median over the
timed steps of the slowest rank) — the machine is shared, so the two calibrations bracket the
load the measurement saw and their mean is used — and predict it with the planner's step-time model
(``launcher.plan.evaluate`` on a cluster made of the calibrated figures). Four processes are
planned as 2 nodes × 2 processes, so every collective that spans both pairs is priced as
inter-node traffic, and measured so: the ranks carry torchrun's environment of two nodes
(``GROUP_RANK``, ``LOCAL_RANK``), all on this machine, so both links are loopback's figures.

Usage::

    python benchmarks/validate_step_time.py                       # all layouts, JSON + markdown table
    python benchmarks/validate_step_time.py --only single,tp2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_parallel import LAYOUTS, build_config, machine, run_in_subprocess  # noqa: E402

from launcher import calibrate  # noqa: E402
from launcher.plan import Cluster, evaluate  # noqa: E402
from training.hardware import HardwareSection  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "validate_step_time.json"
NODES = {1: 1, 2: 1, 4: 2}
"""Simulated nodes per process count (4 processes: 2 nodes × 2)."""


def hardware_of(figures: dict[str, float], procs: int, batch: int):
    section = calibrate.cluster_yaml(figures, procs, batch)["hardware"]
    return HardwareSection.model_validate(section).resolve()


def predict(overrides: tuple[str, ...], procs: int, hardware) -> dict:
    cfg = build_config(overrides, procs)
    layout = cfg.parallel.resolve(procs)
    nodes = NODES[procs]
    cluster = Cluster(nodes, procs // nodes, None, None, hardware=hardware)
    t = evaluate(cfg, layout, cluster).time
    return dict(predicted_ms=t.step_s * 1e3, compute_ms=t.compute_s * 1e3, comm_ms=t.exposed_comm_s * 1e3,
                offload_ms=t.offload_s * 1e3, optimizer_ms=t.optimizer_s * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=str, default=None, help="comma-separated bench_parallel layout keys")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (default 5)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per calibration figure (default 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repredict", action="store_true",
                        help="recompute the predictions of --out from its stored calibrations (no measuring)")
    args = parser.parse_args()
    if args.repredict:
        report = json.loads(args.out.read_text())
        for row in report["rows"]:
            cal = report["calibrations"][row["key"]]
            figures = {key: (cal["before"][key] + cal["after"][key]) / 2 for key in cal["before"]}
            row.update(predict(next(x.overrides for x in LAYOUTS if x.key == row["key"]), row["procs"],
                               hardware_of(figures, row["procs"], cal["batch"])))
            if row.get("measured_ms"):
                row["ratio"] = row["predicted_ms"] / row["measured_ms"]
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(markdown(report))
        return
    keys = set(args.only.split(",")) if args.only else None
    layouts = [lay for lay in LAYOUTS if keys is None or lay.key in keys]
    started = time.time()
    rows, calibrations = [], {}
    for lay in layouts:
        procs = lay.procs
        cfg = build_config(lay.overrides, procs)
        batch = cfg.train.micro_batch_size  # the per-rank batch the kernels run at (8 under tp/dispp)
        # The machine is shared: calibrate just before and just after the measurement, and use the mean.
        before = calibrate.measure(cfg.model, batch, procs, args.budget)
        measured = run_in_subprocess(dict(overrides=list(lay.overrides), procs=procs, steps=args.steps,
                                          procs_per_node=procs // NODES[procs]))
        after = calibrate.measure(cfg.model, batch, procs, args.budget)
        figures = {key: (before[key] + after[key]) / 2 for key in before}
        calibrations[lay.key] = dict(batch=batch, before=before, after=after)
        print(calibrate.describe(figures, procs), flush=True)
        hardware = hardware_of(figures, procs, batch)
        row = dict(key=lay.key, name=lay.name, procs=procs, nodes=NODES[procs], **predict(lay.overrides, procs,
                                                                                       hardware))
        row.update(status=measured["status"], measured_ms=measured.get("ms_median"),
                   measured_min_ms=measured.get("ms_min"), quiet=measured.get("quiet"))
        if row["measured_ms"]:
            row["ratio"] = row["predicted_ms"] / row["measured_ms"]
        rows.append(row)
        print(f"{procs} {lay.key:<14} predicted {row['predicted_ms']:7.0f} ms, measured "
              f"{row['measured_ms'] or float('nan'):7.0f} ms, ratio {row.get('ratio', float('nan')):.2f}",
              flush=True)
    report = dict(machine=machine(), command=" ".join(["python", *sys.argv]), seconds=time.time() - started,
                  calibrations={str(k): v for k, v in calibrations.items()}, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["| procs (nodes) | layout | predicted ms | compute | exposed comm | offload | optimizer | "
             "measured ms: median (min) | predicted / measured |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        measured = f"{r['measured_ms']:.0f} ({r['measured_min_ms']:.0f})" if r["measured_ms"] else r["status"]
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "–"
        lines.append(f"| {r['procs']} ({r['nodes']}) | {r['name']} | {r['predicted_ms']:.0f} | {r['compute_ms']:.0f} | "
                     f"{r['comm_ms']:.0f} | {r['offload_ms']:.0f} | {r['optimizer_ms']:.0f} | {measured} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
