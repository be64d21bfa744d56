#!/usr/bin/env bash
# Second stage of the search behind the defaults of `glora run` (issue 4): every client in
# every round (stage 1, half of the clients a round, stayed at the majority class on the
# held-out slice under Dirichlet 0.5), 5 local steps of batch 32, 20 rounds (1,000 client
# steps, twice stage 1's, in four times as many client-averaging events). Scored on the
# held-out training slice, never on validation.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--task sst2 --rule glora --clients 10 --alpha 0.5 --ranks 2,4,8,16 --fraction 1.0 --rounds 20
        --local-steps 5 --batch-size 32 --eval-every 5 --eval-split heldout --threads 1 --seed 0 --no-progress
        --pooling cls --head-lr-ratio 1)  # the head these runs were made with: first token, the factors' lr
.venv/bin/glora run "${common[@]}" --lr 2e-3 --rule-option readout_gauge=a-normal --out runs/tuning/full-lr2e-3-a-normal --resume > runs/tuning2-a.log 2>&1 &
.venv/bin/glora run "${common[@]}" --lr 2e-3 --rule-option readout_gauge=balanced --out runs/tuning/full-lr2e-3-balanced --resume > runs/tuning2-b.log 2>&1 &
wait
