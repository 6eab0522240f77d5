"""``translution train CONFIG [key=value …]``: the per-process training entry point.

torchrun, the deepspeed launcher or Kubernetes start this in every process; run directly,
it trains in one process.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys

from training.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model (one process of a run)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A fatal signal raised below Python (an abort in a C++ thread, a segfault) then prints every
    # thread's Python stack to this rank's log, which torchrun shows, instead of a bare signal number.
    # (The process's own stderr: ``sys.stderr`` may be a capture without a file descriptor.)
    faulthandler.enable(sys.__stderr__)
    cfg = load_config(args.config, args.overrides)
    from training.preemption import Stopped
    from training.run import train
    from training.trainer import ArtifactError

    try:
        train(cfg)
    except Stopped as stopped:  # checkpointed and logged on every rank; exit as the signal would
        return stopped.exit_code
    except ArtifactError as err:  # the run is complete and checkpointed; the message says how to get the model
        print(f"translution train: error: {err}", file=sys.stderr)
        return 1
    return 0
