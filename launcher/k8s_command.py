"""``translution k8s render CONFIG [key=value …] --out DIR``: Kubernetes manifests for a run.

Writes the training job (PyTorchJob, TrainJob or JobSet), a PVC for checkpoints and data, a
ConfigMap with the resolved config, an MLflow tracking server (behind a login whose Secret the
user creates: the command prints how) and a kustomization, so that ``kubectl apply -k DIR``
starts the run. Nothing is written when the config is bad.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.k8s import FLAVORS, RenderOptions, auth_secret_command, render, write
from launcher.launch_command import intermixed
from training.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("k8s", help="Kubernetes manifests for a run", description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    render_parser = intermixed(actions.add_parser("render", help="write the manifests of a run into a directory",
                                                  description=__doc__.splitlines()[0]))
    render_parser.add_argument("config", help="run config YAML (see configs/)")
    render_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                               help="dotted overrides, e.g. cluster.nodes=4")
    render_parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the manifests")
    render_parser.add_argument("--image",
                               help="container image (default: cluster.image, else translution-dist:latest)")
    render_parser.add_argument("--namespace", metavar="NS", help="namespace of every object (default: none, kubectl's)")
    render_parser.add_argument("--flavor", choices=FLAVORS, default="pytorchjob",
                               help="the training job's kind (default: pytorchjob)")
    render_parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    options = RenderOptions(args.flavor, args.image, args.namespace)
    files = render(cfg, options)
    write(files, args.out)
    print(f"wrote {', '.join(files)} to {args.out}; start with: kubectl apply -k {args.out}")
    if "mlflow.yaml" in files:
        print(f"first, once, create the MLflow login that the server and the trainers read (k8s/README.md):\n"
              f"  {auth_secret_command(cfg, options)}")
    return 0
