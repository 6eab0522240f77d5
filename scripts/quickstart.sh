#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install, build Static MNIST shards, train an
# α-Translution ViT on 2 local CPU processes (FSDP2 over gloo), track the run in runs/mlflow.db.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
[ -f data/mnist-static/index.json ] || .venv/bin/translution data mnist data/mnist-static --mode static
.venv/bin/translution launch configs/quickstart.yaml ${NPROC:+--nproc-per-node "$NPROC"} "$@"  # 2: cluster.procs_per_node
cat <<MSG

Done. Browse the run with:
  .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/runs/mlflow.db
Checkpoints: runs/quickstart/checkpoints/   resolved config: runs/quickstart/config.yaml
MSG
