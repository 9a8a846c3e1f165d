#!/usr/bin/env bash
# Runs one stage (`bebop STAGE --config CFG key=value ...`) on every worker at once; each worker's
# output goes to ~/bebop-runs/RUN/HOST.log and to BUCKET/RUN/logs/ (every 5 minutes and at the end),
# the config to BUCKET/RUN/config.yaml. Checkpoints and metrics go where the config's keys say:
# pass e.g. rl.run_dir=BUCKET/RUN as an override. Processes find each other through the TPU
# environment (bebop_jax.distributed.initialize).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGES=(generate export sample-data pretrain-mtp eval-acceptance rl plan demo)  # the `bebop` subcommands that take --config (analyze reads runs where they lie: run it there)

usage() {
  cat <<USAGE
usage: run.sh --name NAME --zone ZONE --stage STAGE --config FILE --bucket gs://BUCKET[/PATH]
              [--project PROJECT] [--run-name RUN] [--detach] [--dry-run] [--] [section.key=value ...]
  --stage     one of: ${STAGES[*]}
  --config    a local YAML config (copied to the bucket, read from there by every worker)
  --bucket    where runs go: BUCKET/RUN/{config.yaml,logs/}
  --run-name  default: STAGE-YYYYmmdd-HHMMSS (UTC)
  --detach    start the run in the background on the workers and return (logs still reach the bucket)
  --dry-run   print the gcloud commands instead of running them
  section.key=value overrides are passed to bebop as they are (no quotes, \$, \` or backslashes)
USAGE
}

NAME= ZONE= PROJECT= STAGE= CONFIG= BUCKET= RUN= DETACH=0 OVERRIDES=()
split_flags "$@"
set -- ${FLAGS[@]+"${FLAGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --stage) need_value "$@"; STAGE=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --bucket) need_value "$@"; BUCKET=${2%/}; shift 2 ;;
    --run-name) need_value "$@"; RUN=$2; shift 2 ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --*) die "unknown flag '$1'" ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone
require "$STAGE" --stage
require "$CONFIG" --config
require "$BUCKET" --bucket
check_name "$NAME"
[[ " ${STAGES[*]} " == *" $STAGE "* ]] || die "--stage '$STAGE' is not one of: ${STAGES[*]}"
[[ -f $CONFIG ]] || die "--config '$CONFIG' is not a file"
check_bucket "$BUCKET"
[[ -n $RUN ]] || RUN="$STAGE-$(date -u +%Y%m%d-%H%M%S)"
[[ $RUN =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--run-name '$RUN' may hold only letters, digits, '.', '_' and '-'"
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  [[ $override =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=[^\'\"\$\`\\]*$ ]] ||
    die "override '$override' is not section.key=value (without quotes, \$, \` or backslashes)"
done
location_flags

RUN_URL="$BUCKET/$RUN"
DIR="~/bebop-runs/$RUN"
ARGS=""
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do ARGS+=" \"$override\""; done
# The job each worker's login shell (bash) runs; single-quoted on the gcloud command line, so no
# single quotes inside. Detached, it runs in a background subshell that ignores the ssh hangup.
JOB="mkdir -p $DIR && cd $REMOTE_SRC && gcloud storage cp $RUN_URL/config.yaml $DIR/config.yaml || exit 1;"
JOB+=" LOG=$DIR/\$(hostname).log; export PYTHONUNBUFFERED=1;"
JOB+=" (while sleep 300; do gcloud storage cp -q \$LOG $RUN_URL/logs/; done) & SYNC=\$!;"
JOB+=" $REMOTE_VENV/bin/bebop $STAGE --config $DIR/config.yaml$ARGS 2>&1 | tee \$LOG; rc=\${PIPESTATUS[0]};"
JOB+=" kill \$SYNC; gcloud storage cp \$LOG $RUN_URL/logs/; exit \$rc"
if (( DETACH )); then
  REMOTE="(trap \"\" HUP; $JOB) </dev/null >/dev/null 2>&1 &"
else
  REMOTE=$JOB
fi

run gcloud storage cp "$CONFIG" "$RUN_URL/config.yaml"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION[@]}" --command="$REMOTE"
