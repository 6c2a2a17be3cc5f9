#!/usr/bin/env bash
# Set up a fresh machine: the Fashion-MNIST Debian package (when apt is available) and a virtual environment
# with the pinned requirements. Idempotent; VENV overrides the location (default .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "Fashion-MNIST IDX files not found and apt-get is unavailable: install the Debian package" \
      "dataset-fashion-mnist or set --config.data.idx_dir to a folder with the four IDX .gz files" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r requirements.txt
"$VENV/bin/pip" install -q --no-deps -e .
