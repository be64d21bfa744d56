#!/usr/bin/env bash
# Issue 7's comparison: the README's SuperNI example (10 clients, one training task each,
# 5 rounds x 5 local steps of batch 4 x 256 tokens, lr 5e-4, seed 0; ROUGE-L on 20 unseen
# test tasks x 10 instances and 5 held-out instances of each client's task) for glora,
# flexlora and hetlora at ranks 2/4/8/16, fedit at rank 8 (it refuses unequal ranks), the
# centralized reference (pooled data, rank 16, same step budget) and zero-shot (--rounds 0).
# Two chains side by side, one torch thread each (2-core machine). Resumable: a finished
# run is left as it is, an interrupted one continues from its last round.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/superni-comparison
common=(--task superni --clients 10 --superni-eval-instances 10 --seed 0 --threads 1 --no-progress)
run() {
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall, %U s user" .venv/bin/glora run "${common[@]}" "$@" \
    --out "runs/superni-comparison/$name" --resume || true
}
# GLoRA's server rank and HetLoRA's weights pinned at their defaults when these runs were made.
(run glora --rule glora --ranks 2,4,8,16 --rule-option rank=max
 run hetlora --rule hetlora --ranks 2,4,8,16 --rule-option data_weighted=false
 run zero-shot --rule glora --ranks 2,4,8,16 --rounds 0 --rule-option rank=max) > runs/superni-comparison-a.log 2>&1 &
(run flexlora --rule flexlora --ranks 2,4,8,16
 run fedit --rule fedit --ranks 8
 run centralized --rule centralized --ranks 2,4,8,16) > runs/superni-comparison-b.log 2>&1 &
wait
