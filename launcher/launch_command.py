"""``translution launch CONFIG [key=value …]``: start ``translution train`` in every process of a run.

Detects where it runs (``translution topology``), validates the config and the layout against
nodes × processes per node, then becomes torchrun (or the deepspeed launcher). The same
command works on one machine, once per node under SLURM (``srun --ntasks-per-node=1``),
and in every pod of a PyTorchJob, TrainJob or JobSet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.launch import LaunchOptions, build_plan, execute
from launcher.topology import detect
from training import threads
from training.config import load_config


class _IntermixedParser(argparse.ArgumentParser):
    """Takes KEY=VALUE overrides before and after the options (plain argparse stops at the first option)."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inside:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def intermixed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``parser`` (a subcommand's, made by ``add_parser``) mix positional overrides and options."""
    parser.__class__ = _IntermixedParser
    return parser


def positive_int(text: str) -> int:
    return _count(text, 1)


def non_negative_int(text: str) -> int:
    return _count(text, 0)


def _count(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = intermixed(subparsers.add_parser(
        "launch", help="start a run: torchrun/deepspeed running `train` in every process",
        description=__doc__.splitlines()[0]))
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50")
    parser.add_argument("--dry-run", action="store_true", help="print the command (shell-quoted) and exit")
    parser.add_argument("--nproc-per-node", type=positive_int, metavar="N",
                        help="processes per node (default: the scheduler's, cluster.procs_per_node, GPUs, else 1)")
    parser.add_argument("--nnodes", type=positive_int, metavar="N",
                        help="nodes; on a plain machine with MASTER_ADDR set, start the command on each of them")
    parser.add_argument("--max-restarts", type=non_negative_int, metavar="N",
                        help="torchrun restarts of the worker group after a failure (default: "
                             "cluster.max_restarts, else 0)")
    parser.add_argument("--log-dir", type=Path, metavar="DIR", help="write each rank's stdout/stderr under DIR")
    parser.add_argument("--hostfile", type=Path, metavar="FILE", help="DeepSpeed-style hostfile ('host slots=N')")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    options = LaunchOptions(args.nproc_per_node, args.nnodes, args.max_restarts, args.log_dir)
    plan = build_plan(cfg, args.config, args.overrides, detect(hostfile=args.hostfile), options)
    if args.dry_run:  # may print the command for another machine, whose data is not here
        print(plan.shell())
        return 0
    from training.run import check_before_launch  # torch and the models: only when launching

    check_before_launch(cfg, nodes=plan.topology.nodes)
    if threads.THREADS_ENV in plan.env:
        chosen = int(plan.env[threads.THREADS_ENV])
        print(f"translution launch: {threads.describe(chosen, plan.topology.procs_per_node)}", file=sys.stderr)
    execute(plan)
