#!/usr/bin/env bash
# One-GPU check (issue 10, item 7), under 8 minutes on one H100/H200:
#   1. the operator exactness tests on the GPU (float64 exact; fp32 and bf16 autocast within rounding);
#   2. benchmarks/bench_ops.py on the GPU at the paper's sizes (7×7 and 14×14 grids, causal T=160;
#      batch 8, width 192, 3 heads × 64) and the ViT-tiny model step;
#   3. 20 training steps of the paper's GPT-tiny (full Translution, T=160, GPT-2 vocabulary, synthetic
#      tokens, batch 8, bf16) in one process, without and with train.activation_checkpoint=block;
#      the trainer logs tokens/s and MFU (against the card's datasheet BF16 peak) every step;
#   4. torch.compile: benchmarks/bench_compile.py with and without CUDA graphs, and a compiled training run.
# Every stage has its own time limit; a failed stage is reported and the others still run.
#
#   bash benchmarks/gpu_check.sh                           # on the GPU machine
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh      # dry run on the CPU with tiny sizes (about a minute)
#
# Results go to $OUT (the device runner's output folder) if set, else benchmarks/results/gpu_check:
# test logs, bench_ops.json, train_<mode>.json (the trainer's metric history), the MLflow store and summary.txt.
# PYTHON selects the interpreter (default: the repository's .venv, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
RESULTS="${OUT:-benchmarks/results/gpu_check}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
FAILED=0

note() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $RESULTS/NAME.log, record the outcome
  local name=$1 limit=$2 started=$SECONDS rc
  shift 2
  note "$name: started (limit ${limit}s)"
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  rc=$?
  tail -n 5 "$RESULTS/$name.log"
  if [[ $rc -eq 0 ]]; then
    note "$name: ok in $((SECONDS - started))s"
  else
    note "$name: FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', time limit')) after $((SECONDS - started))s; see $name.log"
    FAILED=1
  fi
}

case "$DEVICE" in
  cuda)
    if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
      note "no CUDA device visible to $PYTHON; for a dry run on the CPU use GPU_CHECK_DEVICE=cpu"
      exit 2
    fi
    "$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__,
                  '| CUDA', torch.version.cuda)" | tee -a "$SUMMARY"
    nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
    TEST_LIMIT=60 BENCH_LIMIT=240 TRAIN_LIMIT=80
    BENCH_ARGS=(--device cuda --layouts grid7,grid14,causal160 --sweep-mib "")
    TRAIN_STEPS=20
    MODEL="{arch: gpt, attention: translution, preset: tiny, context_length: 160, vocab_size: 50257}"
    DATA="{kind: synthetic, synthetic: {task: text, samples: 2048, context_length: 160, vocab_size: 50257}}"
    TRAIN_SET="{steps: $TRAIN_STEPS, micro_batch_size: 8, precision: bf16, log_every: 1, eval_batches: 0}"
    ;;
  cpu)
    TEST_LIMIT=300 BENCH_LIMIT=300 TRAIN_LIMIT=300
    BENCH_ARGS=(--quick)
    TRAIN_STEPS=3
    MODEL="{arch: gpt, attention: translution, dim: 32, depth: 2, heads: 2, dim_head: 16, mlp_dim: 64,
            context_length: 16, vocab_size: 64}"
    DATA="{kind: synthetic, synthetic: {task: text, samples: 64, context_length: 16, vocab_size: 64}}"
    TRAIN_SET="{steps: $TRAIN_STEPS, micro_batch_size: 2, log_every: 1, eval_batches: 0}"
    ;;
  *)
    echo "GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2
    exit 2
    ;;
esac

# 1. Operator exactness on the device.
stage test_ops_exact "$TEST_LIMIT" env TRANSLUTION_TEST_DEVICE="$DEVICE" \
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops_exact.py

# 2. Kernels and model step: time, memory, rate against the device's fp32 matmul.
stage bench_ops "$BENCH_LIMIT" "$PYTHON" benchmarks/bench_ops.py "${BENCH_ARGS[@]}" --out "$RESULTS/bench_ops.json"

# 3. Training steps, without and with per-block recomputation. Run directories (the final checkpoint
#    included: about 2 GB for GPT-tiny) go to a scratch directory, not to the results.
RUNS="$(mktemp -d)"
trap 'rm -rf "$RUNS"' EXIT
cat > "$RESULTS/train.yaml" <<EOF
run: {name: gpu_check, output_dir: $RUNS}
model: $MODEL
data: $DATA
parallel: {engine: none}
train: $TRAIN_SET
optim: {warmup_steps: 0}
tracking: {uri: "sqlite:///$RESULTS/mlflow.db", experiment: gpu_check, log_model: false, system_metrics: false}
EOF
for mode in none block; do
  stage "train_$mode" "$TRAIN_LIMIT" "$PYTHON" - "$RESULTS/train.yaml" "$RESULTS/train_$mode.json" \
    "run.name=gpu_check_$mode" "train.activation_checkpoint=$mode" "train.resume=never" <<'EOF'
"""Train, then write the metric history and its steady-state medians (steps after the first two)."""
import json
import statistics
import sys

from training.config import load_config
from training.run import train

config, out, *overrides = sys.argv[1:]
result = train(load_config(config, overrides))
history = {key: [[step, value] for step, value in values] for key, values in result.history.items()}
steady = {key: statistics.median(v for _, v in values[2:] or values) for key, values in history.items()}
json.dump({"final_step": result.final_step, "final_loss": result.final_loss, "steady_median": steady,
           "history": history}, open(out, "w"), indent=1)
print("steady medians:", {k: round(v, 4) for k, v in steady.items()})
EOF
  grep -h "steady medians" "$RESULTS/train_$mode.log" >> "$SUMMARY" 2>/dev/null || true
done

# 4. torch.compile (train.compile): compile time and steady step against eager, per layer and per block
#    (bench_compile.py), with CUDA graphs (mode reduce-overhead) on the GPU; then the trainer with
#    train.compile=true. GPU_CHECK_COMPILE=0 skips this stage.
if [[ "${GPU_CHECK_COMPILE:-1}" == 1 ]]; then
  COMPILE_MODES=(default)
  [[ "$DEVICE" == cuda ]] && COMPILE_MODES+=(reduce-overhead)
  QUICK=(); [[ "$DEVICE" == cpu ]] && QUICK=(--quick --steps 2)
  for mode in "${COMPILE_MODES[@]}"; do
    stage "bench_compile_$mode" "$BENCH_LIMIT" "$PYTHON" benchmarks/bench_compile.py --device "$DEVICE" \
      --mode "$mode" "${QUICK[@]}" --out "$RESULTS/bench_compile_$mode.json"
  done
  stage train_compile "$TRAIN_LIMIT" "$PYTHON" -m launcher.cli train "$RESULTS/train.yaml" \
    "run.name=gpu_check_compile" "train.compile=true" "train.resume=never"
fi

note "done: $([[ $FAILED -eq 0 ]] && echo 'every stage passed' || echo 'SOME STAGES FAILED'); results in $RESULTS"
exit $FAILED
