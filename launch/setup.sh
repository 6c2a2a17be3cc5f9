#!/usr/bin/env bash
# Set up a fresh machine: the Fashion-MNIST Debian package (when apt is available) and a virtual environment
# with the pinned requirements. Idempotent; VENV overrides the location (default .venv in the repository) and
# PYTHON the interpreter that creates it (default python3; jax 0.10 needs Python >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    # Non-interactive: on a host without passwordless sudo this fails with a message instead of prompting.
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; }; then
      echo "could not install the Debian package dataset-fashion-mnist (needs root or passwordless sudo);" \
        "Fashion-MNIST stages will fail until it is installed or --config.data.idx_dir points at the IDX files" >&2
    fi
  else
    echo "Fashion-MNIST IDX files not found and apt-get is unavailable: install the Debian package" \
      "dataset-fashion-mnist or set --config.data.idx_dir to a folder with the four IDX .gz files" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r requirements.txt
"$VENV/bin/pip" install -q --no-deps -e .
