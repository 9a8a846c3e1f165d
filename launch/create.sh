#!/usr/bin/env bash
# Creates a TPU VM or pod slice: `gcloud compute tpus tpu-vm create`, or with --queued a queued
# resource (waits for capacity; the node gets the same name). See launch/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE [--project PROJECT]
                 [--version RUNTIME] [--queued] [--spot] [--dry-run]
  --name              TPU (and queued resource) name, e.g. bebop-v5p
  --zone              e.g. us-east5-a
  --accelerator-type  e.g. v5p-64, v6e-8, v5litepod-16, v4-32
  --project           GCP project (default: gcloud's configured project)
  --version           TPU software version (default by type: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                      v5litepod v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base)
  --queued            request through queued resources (gcloud compute tpus queued-resources create)
  --spot              spot capacity: cheaper, preemptible (training saves on SIGTERM)
  --dry-run           print the gcloud commands instead of running them
USAGE
}

NAME= ZONE= PROJECT= ACCELERATOR_TYPE= VERSION= QUEUED=0 SPOT=0
split_flags "$@"
set -- ${FLAGS[@]+"${FLAGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone
require "$ACCELERATOR_TYPE" --accelerator-type
check_name "$NAME"
[[ -n $VERSION ]] || VERSION=$(default_runtime "$ACCELERATOR_TYPE")
location_flags

if (( QUEUED )); then
  cmd=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOCATION[@]}"
       --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION")
else
  cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
       --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
fi
if (( SPOT )); then cmd+=(--spot); fi
run "${cmd[@]}"
