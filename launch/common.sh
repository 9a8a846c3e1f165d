# shellcheck shell=bash
# Shared by create.sh, setup.sh, run.sh and delete.sh (sourced, not run): flag parsing helpers,
# the TPU runtime for an accelerator type, and `run`, which prints a command under --dry-run
# (one line, quoted so it can be pasted into a shell) and otherwise echoes it to stderr and runs it.

REMOTE_SRC='~/bebop-jax'    # the package source on every worker
REMOTE_VENV='~/bebop-venv'  # its virtual environment (Python 3.12, jax[tpu])
DRY_RUN=0

die() {
  echo "error: $*" >&2
  echo "run '$(basename "$0") --help' for the flags" >&2
  exit 2
}

# split_flags ARGS...: sets FLAGS to ARGS with every --flag=value split into --flag value.
split_flags() {
  FLAGS=()
  local arg
  for arg in "$@"; do
    if [[ $arg == --*=* ]]; then FLAGS+=("${arg%%=*}" "${arg#*=}"); else FLAGS+=("$arg"); fi
  done
}

# need_value FLAG REMAINING_ARGS...: fails unless FLAG is followed by a value.
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}

# require VALUE FLAG: fails if the required FLAG was not given.
require() {
  [[ -n $1 ]] || die "missing required flag $2"
}

check_name() {
  [[ $1 =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$1' must be lowercase letters, digits and dashes, starting with a letter"
}

check_bucket() {
  [[ $1 =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/[-A-Za-z0-9_.]+)*/?$ ]] || die "--bucket '$1' must look like gs://BUCKET[/PATH]"
}

# default_runtime ACCELERATOR_TYPE: the TPU software version for JAX on that TPU generation.
default_runtime() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default --version for accelerator type '$1'; give --version (the TPU software version)" ;;
  esac
}

# location_flags: the --zone/--project flags every gcloud call gets.
location_flags() {
  LOCATION=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then LOCATION+=("--project=$PROJECT"); fi
}

quote() {
  local arg=$1 prefix=
  if [[ $arg =~ ^[-A-Za-z0-9_./:=,@%+]+$ ]]; then printf '%s' "$arg"; return; fi
  if [[ $arg =~ ^(--[a-z][-a-z]*=)(.*)$ ]]; then prefix=${BASH_REMATCH[1]}; arg=${BASH_REMATCH[2]}; fi
  printf "%s'%s'" "$prefix" "${arg//\'/\'\\\'\'}"
}

run() {
  local line= arg
  for arg in "$@"; do line+="$(quote "$arg") "; done
  line=${line% }
  if (( DRY_RUN )); then
    echo "$line"
  else
    echo "+ $line" >&2
    "$@"
  fi
}
