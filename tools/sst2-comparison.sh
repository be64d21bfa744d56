#!/usr/bin/env bash
# Issue 4's comparison on SST-2 validation: the default federation of `glora run` (10 clients,
# Dirichlet 0.5, every client every round, 10 local steps of batch 32, lr 1e-3, seed 0) for
# 20 rounds: glora, flexlora, hetlora and flora with ranks 2/4/8/16, fedit at rank 8, and
# the centralized and local references. glora runs first and alone with the default two
# threads: its first 15 rounds are exactly `glora run` with no options (same seeds; evaluation
# draws no randomness), so its metrics at round 15 time the default on an otherwise idle
# machine. The rest run in two chains side by side, one torch thread each (2-core machine).
# Resumable: a finished run is left as it is, an interrupted one continues.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/sst2-comparison
common=(--task sst2 --clients 10 --alpha 0.5 --fraction 1.0 --rounds 20 --local-steps 10 --batch-size 32
        --lr 1e-3 --eval-every 5 --seed 0 --no-progress
        --pooling cls --head-lr-ratio 1)  # the head these runs were made with: first token, the factors' lr
run() {
  local name=$1 ranks=$2 threads=$3 pinned=()
  # The options whose defaults changed after these runs were made, at their values then.
  case $name in glora) pinned=(--rule-option rank=max) ;; hetlora) pinned=(--rule-option data_weighted=false) ;; esac
  /usr/bin/time -f "$name: %e s wall, %U s user" .venv/bin/glora run "${common[@]}" --rule "$name" "${pinned[@]}" \
    --ranks "$ranks" --threads "$threads" --out "runs/sst2-comparison/$name" --resume || true
}
run glora 2,4,8,16 2 > runs/sst2-comparison-glora.log 2>&1
(run fedit 8 1; run flexlora 2,4,8,16 1; run hetlora 2,4,8,16 1) > runs/sst2-comparison-a.log 2>&1 &
(run flora 2,4,8,16 1; run centralized 2,4,8,16 1; run local 2,4,8,16 1) > runs/sst2-comparison-b.log 2>&1 &
wait
