#!/usr/bin/env bash
# Run one hd stage on a SLURM GPU cluster: set up the repository's virtual environment on this (login) node,
# write an sbatch script that starts one task per node (each task owns all the GPUs of its node and runs the
# same python -m hd.main command; jax.distributed connects them), and submit it. See --help.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
REPO="$(pwd)"

usage() {
  cat <<EOF
Usage: bash launch/gpu_slurm.sh --config=SPEC --workdir=DIR [options] [--config.KEY=VALUE ...] [-- FLAG ...]

Sets up the virtual environment \$VENV (default .venv) with launch/setup.sh and the CUDA build of the same
jax version, writes an sbatch script and submits it. The job runs one task per node; each task owns all
the GPUs of its node and runs the same command, python -m hd.main --config=SPEC --workdir=DIR ..., with
JAX_COORDINATOR_ADDRESS (first node of the job), JAX_NUM_PROCESSES (\$SLURM_NTASKS) and JAX_PROCESS_ID
(\$SLURM_PROCID) exported. The repository, \$VENV and DIR must be on a filesystem every node sees.
Slurm sends SIGTERM two minutes before the time limit: the stage saves a checkpoint and exits, and
submitting the same command again resumes it.

Required:
  --config=SPEC          stage config, e.g. configs/fashion_mnist.py:teacher
  --workdir=DIR          work directory (shared filesystem; relative paths are relative to the repository)
Options:
  --nodes=N              nodes, one task (process) each (default 1)
  --gpus-per-node=G      GPUs per node (default 1)
  --time=T               time limit, e.g. 04:00:00 or 1-00:00:00 (default 04:00:00)
  --partition=P          partition (default: the cluster's default)
  --account=A            account to charge (default: yours)
  --cpus-per-task=C      CPUs per task (default: the cluster's default)
  --job-name=NAME        job name (default hd)
  --port=PORT            coordinator port (default 61440 + job id mod 4096, as JAX's own SLURM detection)
  --sbatch-arg=ARG       extra sbatch option written as '#SBATCH ARG', e.g. --sbatch-arg=--qos=high (repeatable)
  --log-dir=DIR          where the sbatch script and the job's output go (default runs/slurm)
  --jax-extra=EXTRA      jax extra installed after the requirements (default cuda12)
  --jax-version=V        version of jax[EXTRA] (default: the jax version launch/setup.sh installed)
  --no-setup             skip the set-up (\$VENV must already hold the requirements and a CUDA jax)
  --dry-run              print the commands and the sbatch script instead of running and submitting them
  -h, --help             this help
Passed through to hd.main unchanged: --config.KEY=VALUE overrides and every argument after --.

Example:
  bash launch/gpu_slurm.sh --nodes=2 --gpus-per-node=8 --time=12:00:00 --partition=gpu \\
      --config=configs/fashion_mnist.py:B --workdir=/shared/runs/fm/teacher_B --config.num_steps=100000
EOF
}

SCRIPT=launch/gpu_slurm.sh
# shellcheck source=launch/lib.sh
source launch/lib.sh

CONFIG=""
WORKDIR=""
NODES=1
GPUS=1
TIME="04:00:00"
PARTITION=""
ACCOUNT=""
CPUS=""
JOB_NAME="hd"
PORT=""
LOG_DIR="runs/slurm"
JAX_EXTRA="cuda12"
JAX_VERSION=""
SETUP=1
SBATCH_ARGS=()
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --config | --workdir | --nodes | --gpus-per-node | --time | --partition | --account | --cpus-per-task | \
      --job-name | --port | --sbatch-arg | --log-dir | --jax-extra | --jax-version)
      if [ $# -lt 2 ] || { [[ "$2" == --* ]] && [ "$1" != --sbatch-arg ]; }; then
        usage_error "option $1 needs a value"
      fi
      set -- "$1=$2" "${@:3}"
      continue ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --cpus-per-task=*) CPUS="${1#*=}" ;;
    --job-name=*) JOB_NAME="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --sbatch-arg=*) SBATCH_ARGS+=("${1#*=}") ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --jax-extra=*) JAX_EXTRA="${1#*=}" ;;
    --jax-version=*) JAX_VERSION="${1#*=}" ;;
    --no-setup) SETUP=0 ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*) PASS+=("$1") ;;
    --) shift; PASS+=("$@"); break ;;
    *) usage_error "unknown option or argument '$1' (hd.main flags go after --)" ;;
  esac
  shift
done

[ -n "$CONFIG" ] || usage_error "missing required option --config (e.g. --config=configs/fashion_mnist.py:teacher)"
[ -n "$WORKDIR" ] || usage_error "missing required option --workdir"
positive_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || usage_error "$1 must be a positive integer, not '$2'"; }
plain_word() { [[ "$2" =~ ^[A-Za-z0-9_.:,@+-]+$ ]] || usage_error "$1 must be a plain word, not '$2'"; }
positive_int --nodes "$NODES"
positive_int --gpus-per-node "$GPUS"
[ -z "$CPUS" ] || positive_int --cpus-per-task "$CPUS"
[ -z "$PORT" ] || positive_int --port "$PORT"
plain_word --time "$TIME"
plain_word --job-name "$JOB_NAME"
plain_word --jax-extra "$JAX_EXTRA"
[ -z "$PARTITION" ] || plain_word --partition "$PARTITION"
[ -z "$ACCOUNT" ] || plain_word --account "$ACCOUNT"
[ -z "$JAX_VERSION" ] || plain_word --jax-version "$JAX_VERSION"
[[ "$LOG_DIR" =~ ^[^[:space:]]+$ ]] || usage_error "--log-dir must not contain white space: '$LOG_DIR'"
for arg in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
  [[ "$arg" =~ ^-[^[:space:]]+$ ]] || usage_error "--sbatch-arg must be one sbatch option without white space: '$arg'"
done
case "$LOG_DIR" in /*) LOG_ABS="$LOG_DIR" ;; *) LOG_ABS="$REPO/$LOG_DIR" ;; esac
SCRIPT="$LOG_DIR/$JOB_NAME.sbatch"

# The command every task runs, from the repository root.
CMD=("$VENV/bin/python" -m hd.main --config="$CONFIG" --workdir="$WORKDIR" ${PASS[@]+"${PASS[@]}"})

sbatch_script() {
  echo "#!/usr/bin/env bash"
  echo "# Written by launch/gpu_slurm.sh: one task per node, each owning all the GPUs of its node; every task runs"
  echo "# the same hd.main command and jax.distributed connects them through the first node."
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS"
  [ -z "$CPUS" ] || echo "#SBATCH --cpus-per-task=$CPUS"
  echo "#SBATCH --time=$TIME"
  [ -z "$PARTITION" ] || echo "#SBATCH --partition=$PARTITION"
  [ -z "$ACCOUNT" ] || echo "#SBATCH --account=$ACCOUNT"
  echo "#SBATCH --output=$LOG_ABS/%x-%j.out"
  echo "#SBATCH --signal=TERM@120"
  for arg in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do echo "#SBATCH $arg"; done
  echo "set -euo pipefail"
  echo "cd $(quote "$REPO")"
  if [ -n "$PORT" ]; then echo "PORT=$PORT"; else echo "PORT=\$((SLURM_JOB_ID % 4096 + 61440))"; fi
  cat <<'EOF'
read -r FIRST_NODE < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export JAX_COORDINATOR_ADDRESS="$FIRST_NODE:$PORT"
echo "hd: $SLURM_NTASKS processes on $SLURM_NNODES nodes, coordinator $JAX_COORDINATOR_ADDRESS"
# Every task exports its own process id and runs the same command.
# shellcheck disable=SC2016  # expanded by each task's shell
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"' hd \
EOF
  echo "  $(quote "${CMD[@]}")"
}

if [ "$SETUP" -eq 1 ]; then
  run bash launch/setup.sh
  if [ -n "$JAX_VERSION" ]; then
    run "$VENV/bin/pip" install -q "jax[$JAX_EXTRA]==$JAX_VERSION"
  else
    # The accelerator build of exactly the jax version the requirements resolved to.
    # shellcheck disable=SC2016  # expanded by the inner shell
    run bash -c 'v="$("$1/bin/python" -c "import jax; print(jax.__version__)")" && "$1/bin/pip" install -q "jax[$2]==$v"' \
      _ "$VENV" "$JAX_EXTRA"
  fi
elif [ "$DRY_RUN" -eq 0 ] && [ ! -x "$VENV/bin/python" ]; then
  echo "launch/gpu_slurm.sh: --no-setup but $VENV/bin/python does not exist: drop --no-setup or set VENV" >&2
  exit 1
fi
run mkdir -p "$LOG_DIR"
if [ "$DRY_RUN" -eq 1 ]; then
  echo "# sbatch script, written to $SCRIPT:"
  sbatch_script
  echo "# end of sbatch script"
else
  sbatch_script >"$SCRIPT"
  echo "+ wrote $SCRIPT (job output: $LOG_ABS/$JOB_NAME-<job id>.out)" >&2
fi
run sbatch "$SCRIPT"
