#!/usr/bin/env bash
# Set up (launch/setup.sh) and run the whole HD pipeline on Fashion-MNIST on this machine:
# teacher -> sketch -> refine -> evaluation. Rerunning skips finished stages and resumes an interrupted one.
# Usage: bash launch/pipeline.sh [WORKDIR] [extra hd.pipeline flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV="${VENV:-.venv}"
WORKDIR="${1:-runs/fashion_mnist}"
shift || true
"$VENV/bin/python" -m hd.pipeline --config=configs/fashion_mnist.py --workdir="$WORKDIR" "$@"
