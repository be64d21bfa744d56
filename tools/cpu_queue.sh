#!/usr/bin/env bash
# The evidence queue on this 2-core CPU machine: WORKERS background processes (one thread
# each) that run the steps below in order, each step a `glora sweep` from a git worktree pinned
# at the commit the step's runs were started with, so that code changed during a session never
# reaches a running sweep and a step's runs all come from one version. A sweep skips the runs
# the other worker holds (a lock per run) and finished ones, and resumes interrupted ones from
# their last checkpoint, so the queue restarts where it stopped: after a session ends, run it
# again. Finished runs are committed by hand (folders with a summary.json).
#
#   bash tools/cpu_queue.sh            # start WORKERS=2 workers, logs in results/sweeps/logs/
#   bash tools/cpu_queue.sh --list     # the steps, and the worktree each one runs from
#
# The steps (issues #28, #29, #33; results/sweeps/PROTOCOL.md):
#   1. lr-tuning-rules, every rule but HetLoRA, at d811512 (where the grid began);
#   2. lr-tuning-rules, HetLoRA, at 8e5336a (its current default, data_weighted = true);
#   3. budget-pilot, each rule at its own tuned rate (needs GLoRA's and FedIT's tuning done);
#   4. superni-all-tasks: FlexLoRA's SuperNI protocol, 681 clients, 5% a round, one seed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORKERS=${WORKERS:-2}
LOGS=$ROOT/results/sweeps/logs
TUNING=$ROOT/results/sweeps/lr-tuning-rules
NON_HET=glora,fedit,ffa-lora,flora,flexlora,fedex-lora,fedsa-lora,rolora,florist,centralized,local
STEPS=(
  "d811512|lr-tuning-rules --results $TUNING --only-rules $NON_HET"
  "8e5336a|lr-tuning-rules --results $TUNING --only-rules hetlora"
  "8473bb3|budget-pilot --results $ROOT/results/sweeps/budget-pilot --lr-from $TUNING --lr-per-rule"
  "8473bb3|superni-all-tasks --results $ROOT/results/superni-all-tasks/runs"
)

worktree() {  # the pinned checkout of commit $1, made once
  local dir=$ROOT/../glora-at-$1
  [ -d "$dir" ] || git worktree add --detach "$dir" "$1" >/dev/null 2>&1 || return 1
  echo "$dir"
}

if [ "${1:-}" = "--list" ]; then
  for step in "${STEPS[@]}"; do echo "${step%%|*}: glora sweep ${step#*|}"; done
  exit 0
fi

mkdir -p "$LOGS"
for w in $(seq 1 "$WORKERS"); do
  (
    for step in "${STEPS[@]}"; do
      dir=$(worktree "${step%%|*}") || { echo "no worktree for ${step%%|*}"; continue; }
      echo "== $(date -u +%FT%TZ) worker $w: glora sweep ${step#*|} (code of ${step%%|*})"
      # shellcheck disable=SC2086  # the step's arguments are split on purpose
      PYTHONPATH=$dir/src OMP_NUM_THREADS=1 "$ROOT/.venv/bin/python" -m glora.cli sweep ${step#*|} \
        --threads 1 --no-progress
    done
  ) >>"$LOGS/queue-w$w.log" 2>&1 &
  sleep 20  # the first worker claims its run before the second looks
done
echo "started $WORKERS workers; logs: $LOGS/queue-w*.log"
