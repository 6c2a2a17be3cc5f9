#!/usr/bin/env bash
# Set up this machine (launch/setup.sh) and run one stage (python -m hd.main) or the whole pipeline
# (python -m hd.pipeline). Rerunning the same command resumes from the newest checkpoint.
# See `bash launch/local.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

usage() {
  cat <<EOF
Usage: bash launch/local.sh --config=SPEC --workdir=DIR [options] [--config.KEY=VALUE ...] [-- FLAG ...]

Sets up this machine with launch/setup.sh (the Fashion-MNIST package and a virtual environment at \$VENV,
default .venv) and runs one stage, python -m hd.main, or with --pipeline the whole pipeline,
python -m hd.pipeline. Rerunning the same command resumes from the newest checkpoint.

Required:
  --config=SPEC      stage config, e.g. configs/fashion_mnist.py:teacher
                     (with --pipeline the config file alone, e.g. configs/fashion_mnist.py)
  --workdir=DIR      work directory of the stage (of every stage with --pipeline)
Options:
  --pipeline         run python -m hd.pipeline instead of one stage
  --no-setup         skip launch/setup.sh (\$VENV must already hold the requirements)
  --dry-run          print the commands instead of running them
  -h, --help         this help
Passed through unchanged: --config.KEY=VALUE overrides (one stage), --set=KEY=VALUE and --profile=NAME
(--pipeline), and every argument after --.

Examples:
  bash launch/local.sh --config=configs/fashion_mnist.py:teacher --workdir=runs/fm/teacher --config.num_steps=500
  bash launch/local.sh --pipeline --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist --profile=tiny
EOF
}

SCRIPT=launch/local.sh
# shellcheck source=launch/lib.sh
source launch/lib.sh

CONFIG=""
WORKDIR=""
PIPELINE=0
SETUP=1
STAGE_ARGS=()
PIPELINE_ARGS=()
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --config | --workdir)
      if [ $# -lt 2 ] || [[ "$2" == --* ]]; then usage_error "option $1 needs a value"; fi
      set -- "$1=$2" "${@:3}"
      continue ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --pipeline) PIPELINE=1 ;;
    --no-setup) SETUP=0 ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*) STAGE_ARGS+=("$1") ;;
    --set=* | --profile=*) PIPELINE_ARGS+=("$1") ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) usage_error "unknown option or argument '$1' (hd flags go after --)" ;;
  esac
  shift
done

[ -n "$CONFIG" ] || usage_error "missing required option --config (e.g. --config=configs/fashion_mnist.py:teacher)"
[ -n "$WORKDIR" ] || usage_error "missing required option --workdir"
if [ "$PIPELINE" -eq 1 ]; then
  [ ${#STAGE_ARGS[@]} -eq 0 ] ||
    usage_error "${STAGE_ARGS[0]}: --config.KEY=VALUE overrides one stage; with --pipeline use --set=KEY=VALUE"
  MODULE=hd.pipeline
  ARGS=(${PIPELINE_ARGS[@]+"${PIPELINE_ARGS[@]}"})
else
  [ ${#PIPELINE_ARGS[@]} -eq 0 ] || usage_error "${PIPELINE_ARGS[0]} is an hd.pipeline flag: add --pipeline"
  MODULE=hd.main
  ARGS=(${STAGE_ARGS[@]+"${STAGE_ARGS[@]}"})
fi

if [ "$SETUP" -eq 1 ]; then
  run bash launch/setup.sh
elif [ "$DRY_RUN" -eq 0 ] && [ ! -x "$VENV/bin/python" ]; then
  echo "launch/local.sh: --no-setup but $VENV/bin/python does not exist: drop --no-setup or set VENV" >&2
  exit 1
fi
run_last "$VENV/bin/python" -m "$MODULE" --config="$CONFIG" --workdir="$WORKDIR" \
  ${ARGS[@]+"${ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
