#!/usr/bin/env bash
# Creates a virtual environment (.venv, or $VENV) and installs translution-dist into it.
#
# PyTorch is installed first, so that the project's `torch>=2.6` range is already satisfied:
#   - a torch that is already importable in the venv is kept (GPU images bring their own CUDA build);
#   - $TORCH_SPEC, when set, is installed as given (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...");
#   - on a machine with an NVIDIA driver, the default `torch` (a CUDA build) is installed;
#   - otherwise `torch==2.13.0`, which pip resolves to the CPU wheel where one lies in its find-links.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-train,deepspeed,dev}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.6"
  else
    spec="torch==2.13.0"
  fi
  echo "install.sh: installing PyTorch ($spec)"
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
  "$PY" -m pip install -q $spec
fi

echo "install.sh: installing translution-dist[$EXTRAS]"
"$PY" -m pip install -q -e ".[$EXTRAS]"
"$PY" -c "import torch, translution_dist; print('install.sh: torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
