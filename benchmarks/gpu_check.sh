#!/usr/bin/env bash
# GPU check, one command on a machine with an NVIDIA GPU: installs the project into a venv
# (pinned torch==2.14.1 with its CUDA wheels, from constraints.txt), then trains CLIP and the
# decoder through `unclip`'s Ray Train + DeepSpeed loop at ZeRO-2 and ZeRO-3 (bf16, NCCL, one
# worker) and writes samples/s, MFU and peak GPU memory to --out (default ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--steps 60] [--peak-tflops T] [--dry-run]
#
# --dry-run writes and validates the configs only: no install, no CUDA (uses $PYTHON or
# .venv). VENV (default .venv-gpu) picks the venv; SKIP_INSTALL=1 uses it as it is.
# The run is cut at TIME_LIMIT seconds (default 480); results are written after each stage.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ " $* " == *" --dry-run "* ]]; then
  exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
fi

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
VENV=${VENV:-.venv-gpu}
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e .
fi
"$VENV/bin/python" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
timeout "${TIME_LIMIT:-480}" "$VENV/bin/python" benchmarks/gpu_check.py "$@"
