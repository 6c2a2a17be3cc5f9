# Shared by the launch scripts (sourced after `cd` to the repository root): option errors, shell quoting and
# commands that are printed, and run unless DRY_RUN=1. The sourcing script sets SCRIPT to its own path.
# shellcheck shell=bash

usage_error() {
  echo "$SCRIPT: $*" >&2
  echo "Run 'bash $SCRIPT --help' for the options." >&2
  exit 2
}

# Shell-quote each argument (plain words stay bare), so that printed commands can be pasted back.
quote() {
  local out="" word q="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="${out:+ }$word"
    else
      out+="${out:+ }'${word//\'/$q}'"
    fi
  done
  printf '%s\n' "$out"
}

DRY_RUN=0
# Print a command (stdout in a dry run, stderr otherwise) and run it unless this is a dry run.
run() {
  if [ "$DRY_RUN" -eq 1 ]; then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# The same for a last command that replaces the shell (so that SIGTERM reaches the training process, which
# then saves a checkpoint and exits).
run_last() {
  if [ "$DRY_RUN" -eq 1 ]; then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    exec "$@"
  fi
}
