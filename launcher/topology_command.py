"""``translution topology [--json] [--hostfile FILE]``: what ``launch`` would see here.

Run it on a login node, inside ``srun`` or in a pod to check the detected node count, rank,
processes per node and rendezvous before starting a job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from launcher.topology import detect


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("topology", help="show the detected nodes, devices and rendezvous",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--hostfile", type=Path, help="DeepSpeed-style hostfile ('host slots=N' lines)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    topology = detect(hostfile=args.hostfile)
    print(json.dumps(topology.to_dict(), indent=2) if args.json else topology.describe())
    return 0
