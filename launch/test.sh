#!/usr/bin/env bash
# Set up (launch/setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV="${VENV:-.venv}"
"$VENV/bin/python" -m pytest -q --durations=15 "$@"
