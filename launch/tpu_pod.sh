#!/usr/bin/env bash
# Run one hd stage on a Cloud TPU VM slice (one host or a pod slice): create the slice unless it exists, ship
# this repository (git archive) to every worker, set each worker up, run the same python -m hd.main command on
# every worker (JAX finds the other workers by itself) and pull every worker's log back. See --help.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<EOF
Usage: bash launch/tpu_pod.sh --name=TPU --zone=ZONE --config=SPEC --workdir=DIR [options]
                              [--config.KEY=VALUE ...] [-- FLAG ...]

1. creates the TPU VM slice TPU unless 'gcloud compute tpus tpu-vm describe' finds it (it must be READY);
2. copies 'git archive REF' of this repository to every worker and unpacks it in ~/hd;
3. on every worker: a Python >= 3.11 virtual environment ~/hd/.venv, launch/setup.sh, then jax[tpu] of the
   jax version the requirements resolved to;
4. runs python -m hd.main --config=SPEC --workdir=DIR ... on every worker under nohup (appending to
   ~/hd-logs/hd.log there; an ssh drop does not stop training) and waits for it to end;
5. pulls every worker's log to LOG_DIR/<worker>.log.
A preempted or interrupted run resumes from its newest checkpoint when the same command runs again (a
preempted slice must be deleted first: gcloud compute tpus tpu-vm delete TPU --zone=ZONE).

Required:
  --name=TPU             TPU VM name (created when absent, reused when READY)
  --zone=ZONE            zone, e.g. us-central2-b
  --config=SPEC          stage config, e.g. configs/fashion_mnist.py:teacher (relative to the repository)
  --workdir=DIR          work directory every worker writes to: gs://BUCKET/... for a multi-host slice
Options:
  --accelerator-type=T   slice to create, e.g. v4-8, v4-32, v5litepod-16, v5p-64, v6e-16 (default v4-8)
  --version=RUNTIME      TPU software version to create with (default for v4 tpu-ubuntu2204-base, for v5e
                         v2-alpha-tpuv5-lite, for v5p v2-alpha-tpuv5, for v6e v2-alpha-tpuv6e)
  --project=PROJECT      Google Cloud project (default: gcloud's configured project)
  --spot                 create a Spot TPU (preemptible; rerun to resume)
  --ref=REF              git commit, branch or tag to ship (default HEAD; uncommitted changes are not shipped)
  --python=PY            interpreter for the workers' virtual environment, >= 3.11 (default python3.11;
                         installed with apt, with PY-venv, when missing)
  --jax-version=V        version of jax[tpu] (default: the jax version launch/setup.sh installed)
  --log-dir=DIR          local directory for the workers' logs (default runs/tpu/TPU)
  --no-setup             ship the code but skip step 3 (the workers are already set up)
  --detach               start training and return without waiting for it (pull logs later with --logs-only)
  --logs-only            only pull the workers' logs (step 5); --config and --workdir are not needed
  --dry-run              print the commands instead of running them
  -h, --help             this help
Passed through to hd.main unchanged: --config.KEY=VALUE overrides and every argument after --.
gcloud must be logged in; for --worker=all, add your Google Compute Engine key first:
ssh-add ~/.ssh/google_compute_engine.

Example:
  bash launch/tpu_pod.sh --name=hd-v4-32 --zone=us-central2-b --accelerator-type=v4-32 \\
      --config=configs/fashion_mnist.py:B --workdir=gs://my-bucket/hd/teacher_B --config.num_steps=100000
EOF
}

SCRIPT=launch/tpu_pod.sh
# shellcheck source=launch/lib.sh
source launch/lib.sh

NAME=""
ZONE=""
CONFIG=""
WORKDIR=""
ACCEL="v4-8"
VERSION=""
PROJECT=""
SPOT=0
REF="HEAD"
PYTHON="python3.11"
JAX_VERSION=""
LOG_DIR=""
SETUP=1
DETACH=0
LOGS_ONLY=0
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name | --zone | --config | --workdir | --accelerator-type | --version | --project | --ref | --python | \
      --jax-version | --log-dir)
      if [ $# -lt 2 ] || [[ "$2" == --* ]]; then usage_error "option $1 needs a value"; fi
      set -- "$1=$2" "${@:3}"
      continue ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --accelerator-type=*) ACCEL="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --jax-version=*) JAX_VERSION="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --no-setup) SETUP=0 ;;
    --detach) DETACH=1 ;;
    --logs-only) LOGS_ONLY=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*) PASS+=("$1") ;;
    --) shift; PASS+=("$@"); break ;;
    *) usage_error "unknown option or argument '$1' (hd.main flags go after --)" ;;
  esac
  shift
done

[ -n "$NAME" ] || usage_error "missing required option --name (the TPU VM to create or reuse)"
[ -n "$ZONE" ] || usage_error "missing required option --zone (e.g. --zone=us-central2-b)"
if [ "$LOGS_ONLY" -eq 0 ]; then
  [ -n "$CONFIG" ] || usage_error "missing required option --config (e.g. --config=configs/fashion_mnist.py:teacher)"
  [ -n "$WORKDIR" ] || usage_error "missing required option --workdir (gs://BUCKET/... on a multi-host slice)"
fi
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  usage_error "--name must be lower-case letters, digits and dashes, starting with a letter: '$NAME'"
plain_word() { [[ "$2" =~ ^[A-Za-z0-9_.:@+-]+$ ]] || usage_error "$1 must be a plain word, not '$2'"; }
plain_word --zone "$ZONE"
plain_word --accelerator-type "$ACCEL"
plain_word --ref "$REF"
[ -z "$VERSION" ] || plain_word --version "$VERSION"
[ -z "$PROJECT" ] || plain_word --project "$PROJECT"
[ -z "$JAX_VERSION" ] || plain_word --jax-version "$JAX_VERSION"
[[ "$PYTHON" =~ ^[A-Za-z0-9_./+-]+$ ]] || usage_error "--python must be a command name or path, not '$PYTHON'"
if [ -z "$VERSION" ]; then
  case "$ACCEL" in
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi
LOG_DIR="${LOG_DIR:-runs/tpu/$NAME}"
if [ "$LOGS_ONLY" -eq 0 ] && [[ "$WORKDIR" != gs://* ]]; then
  echo "launch/tpu_pod.sh: note: --workdir=$WORKDIR is not a gs:// bucket; on a multi-host slice every worker" \
    "must see the same directory (relative paths are relative to ~/hd on each worker)" >&2
fi

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[ -z "$PROJECT" ] || WHERE+=(--project="$PROJECT")
ARCHIVE="${TMPDIR:-/tmp}/hd-$NAME.tar.gz"
[ "$DRY_RUN" -eq 1 ] || trap 'rm -f "$ARCHIVE"' EXIT

# Commands run by each worker's login shell. They use $HOME (expanded there) and quote every value of ours.
# shellcheck disable=SC2016
{
  UNPACK='set -e; mkdir -p "$HOME/hd"; tar -xzf "$HOME/hd.tar.gz" -C "$HOME/hd"; rm -f "$HOME/hd.tar.gz"'
  PY="$(quote "$PYTHON")"
  SETUP_CMD="$UNPACK"'; cd "$HOME/hd"; if [ ! -x .venv/bin/python ]; then if ! '"$PY"' -m venv .venv; then'
  SETUP_CMD+=' sudo apt-get update -qq; sudo apt-get install -y -qq '"$(quote "$PYTHON" "$PYTHON-venv")"';'
  SETUP_CMD+=' '"$PY"' -m venv --clear .venv; fi; fi; bash launch/setup.sh; '
  if [ -n "$JAX_VERSION" ]; then
    SETUP_CMD+='.venv/bin/pip install -q "jax[tpu]=='"$JAX_VERSION"'"'
  else
    SETUP_CMD+='v="$(.venv/bin/python -c "import jax; print(jax.__version__)")"; .venv/bin/pip install -q "jax[tpu]==$v"'
  fi
  MAIN="$(quote .venv/bin/python -m hd.main --config="$CONFIG" --workdir="$WORKDIR" ${PASS[@]+"${PASS[@]}"})"
  LOGS='"$HOME/hd-logs"'
  RUN_CMD='set -e; cd "$HOME/hd"; mkdir -p '"$LOGS"'; if [ -f '"$LOGS"'/hd.pid ] &&'
  RUN_CMD+=' grep -qs hd.main "/proc/$(cat '"$LOGS"'/hd.pid)/cmdline"; then'
  RUN_CMD+=' echo "hd.main is already running on $(hostname)" >&2; exit 1; fi;'
  RUN_CMD+=' echo "== $(date -u +%FT%TZ) $(hostname): launch/tpu_pod.sh starts hd.main" >>'"$LOGS"'/hd.log;'
  RUN_CMD+=' nohup '"$MAIN"' >>'"$LOGS"'/hd.log 2>&1 </dev/null & echo $! >'"$LOGS"'/hd.pid'
  [ "$DETACH" -eq 1 ] || RUN_CMD+='; wait $!'
  LOGS_CMD='cat '"$LOGS"'/hd.log'
}

pull_logs() {
  run mkdir -p "$LOG_DIR"
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$LOGS_CMD" --output-directory="$LOG_DIR" ||
    { echo "launch/tpu_pod.sh: could not pull the logs" >&2; return 1; }
  [ "$DRY_RUN" -eq 1 ] || echo "launch/tpu_pod.sh: the workers' logs are $LOG_DIR/<worker>.log" >&2
}

if [ "$LOGS_ONLY" -eq 1 ]; then
  pull_logs
  exit
fi

# 1. The slice.
CREATE=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
[ "$SPOT" -eq 0 ] || CREATE+=(--spot)
DESCRIBE=("${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)')
if [ "$DRY_RUN" -eq 1 ]; then
  echo "+ $(quote "${DESCRIBE[@]}")"
  echo "# only if it does not exist (an existing slice must be READY):"
  echo "+ $(quote "${CREATE[@]}")"
else
  echo "+ $(quote "${DESCRIBE[@]}")" >&2
  if STATE="$("${DESCRIBE[@]}" 2>/dev/null)"; then
    if [ "$STATE" != READY ]; then
      echo "launch/tpu_pod.sh: TPU $NAME exists but is ${STATE:-in an unknown state}, not READY." >&2
      echo "If it was preempted, delete it and rerun this command (training resumes from its checkpoint):" >&2
      echo "  $(quote "${TPU[@]}" delete "$NAME" "${WHERE[@]}")" >&2
      exit 1
    fi
    echo "launch/tpu_pod.sh: reusing TPU $NAME (READY)" >&2
  else
    run "${CREATE[@]}"
  fi
fi

# 2. The code.
if [ "$DRY_RUN" -eq 0 ] && [ "$REF" = HEAD ] && [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "launch/tpu_pod.sh: note: uncommitted changes are not shipped (git archive HEAD)" >&2
fi
run git archive --format=tar.gz --output="$ARCHIVE" "$REF"
run "${TPU[@]}" scp "$ARCHIVE" "$NAME:hd.tar.gz" "${WHERE[@]}" --worker=all
run rm -f "$ARCHIVE"

# 3. Set-up (or only unpacking).
if [ "$SETUP" -eq 1 ]; then
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$SETUP_CMD"
else
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$UNPACK"
fi

# 4. Training on every worker, 5. logs.
STATUS=0
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$RUN_CMD" || STATUS=$?
pull_logs || true
if [ "$STATUS" -ne 0 ]; then
  echo "launch/tpu_pod.sh: the run ended with status $STATUS. If only the ssh connection dropped, training goes on:" \
    "pull the logs with --logs-only. Rerunning this command resumes from the newest checkpoint." >&2
elif [ "$DETACH" -eq 1 ] && [ "$DRY_RUN" -eq 0 ]; then
  echo "launch/tpu_pod.sh: started; pull the logs with:" \
    "bash launch/tpu_pod.sh --name=$NAME --zone=$ZONE --logs-only" >&2
fi
exit "$STATUS"
