#!/usr/bin/env bash
# Deletes a TPU VM or pod slice; with --queued, its queued resource (and the node with it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: delete.sh --name NAME --zone ZONE [--project PROJECT] [--queued] [--dry-run]
  --queued   the TPU was created with create.sh --queued: delete the queued resource (--force
             deletes its node too)
  --dry-run  print the gcloud command instead of running it
USAGE
}

NAME= ZONE= PROJECT= QUEUED=0
split_flags "$@"
set -- ${FLAGS[@]+"${FLAGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone
check_name "$NAME"
location_flags

if (( QUEUED )); then
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
fi
