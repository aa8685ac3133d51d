#!/usr/bin/env bash
# Creates the environment benchmarks/peers.py runs in: DALLE2-pytorch beside this project's
# code, kept out of the project's own .venv (it is a benchmark peer, never a dependency).
#   bash benchmarks/peers_env.sh [/work/peers-venv]
# torch is pinned to the project's version so both sides run the same kernels (and pip does
# not fetch another multi-GB torch build).
set -euo pipefail
env_dir="${1:-/work/peers-venv}"
python="${PYTHON:-python3.11}"
"$python" -m venv "$env_dir"
"$env_dir/bin/pip" install --quiet dalle2-pytorch torch==2.14.1 torchvision==0.29.1

"$env_dir/bin/python" -c "import torch, dalle2_pytorch; print('torch', torch.__version__)"
