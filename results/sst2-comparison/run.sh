#!/usr/bin/env bash
# Issue 4's comparison on SST-2 validation: the default federation of `glora run`
# (10 clients, Dirichlet 0.5, all clients every round, 10 local steps of batch 32, lr 2e-3,
# 15 rounds, seed 0) for glora, flexlora, hetlora and flora with ranks 2/4/8/16, fedit at
# rank 8, and the centralized and local references. Two chains side by side, one torch
# thread each (2-core machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
common=(--task sst2 --clients 10 --alpha 0.5 --fraction 1.0 --rounds 15 --local-steps 10 --batch-size 32
        --lr 2e-3 --eval-every 5 --threads 1 --seed 0 --no-progress)
run() { .venv/bin/glora run "${common[@]}" --rule "$1" --ranks "$2" --out "runs/sst2-comparison/$1" --resume || true; }
(run glora 2,4,8,16; run flexlora 2,4,8,16; run flora 2,4,8,16; run local 2,4,8,16) > runs/sst2-comparison-a.log 2>&1 &
(run fedit 8; run hetlora 2,4,8,16; run centralized 2,4,8,16) > runs/sst2-comparison-b.log 2>&1 &
wait
