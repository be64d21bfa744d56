#!/usr/bin/env bash
# The GPU check of issue #27 (benchmarks/gpu_check.py): a 1B-class causal model's local step
# and a short federated SuperNI run, its base in bfloat16 and in 4-bit NF4, on one GPU.
#
# Here (with internet to PyPI), once:      bash benchmarks/gpu_check.sh --prepare
#   builds .gpu-check/ (git-ignored, about 16 MB): what the GPU image lacks (bitsandbytes
#   with its CUDA 13 libraries only, the transformers and peft this project pins: an xz
#   tarball; nltk and rouge-score wheels), SmolLM2's tokenizer, and the SuperNI files of
#   gpu_check.py's eight tasks.
# On the GPU machine (torch there, no network), from the repository root with .gpu-check
# carried, as one command:                 bash benchmarks/gpu_check.sh [OUT]
#   installs all of it into a folder of its own, builds the random 1B-shaped Llama, runs
#   gpu_check.py and writes gpu_check.json and gpu_check.md to OUT (default $OUT, else
#   ./gpu-check-out). About 5 minutes on an H200, most of it building and loading the model.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.gpu-check

if [ "${1:-}" = --prepare ]; then
  grep -qx "/.gpu-check/" .git/info/exclude 2>/dev/null || echo "/.gpu-check/" >> .git/info/exclude
  PY=.venv/bin/python
  data=${GLORA_DATA_DIR:-../shared/data}
  rm -rf "$B" && mkdir -p "$B/wheels" "$B/data/superni/tasks" "$B/tokenizer"
  $PY -m pip download -q --no-deps --only-binary=:all: -d "$B/wheels" nltk==3.10.4
  $PY -m pip wheel -q --no-deps -w "$B/wheels" rouge-score==0.1.2  # an sdist only: built here, pure Python
  # bitsandbytes for the GPU machine's platform (Python 3.12, x86-64), with only the CUDA 13
  # libraries its torch (cu130) loads: its wheel's other fourteen builds would pass the 64 MiB
  # a call can send. Installed into one folder with the pinned transformers and peft.
  $PY -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --target "$B/site" bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2
  find "$B/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
  tar cf - -C "$B/site" . | xz -9 -T2 > "$B/site.tar.xz"
  git rev-parse HEAD > "$B/COMMIT"  # the copy sent to the GPU machine has no .git
  rm -rf "$B/site"
  cp -r "$data/superni/splits" "$data/superni/task_metadata.jsonl.gz" "$B/data/superni/"
  for t in $($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_check as g; print(*g.TRAIN_TASKS, *g.TEST_TASKS)"); do
    cp "$data/superni/tasks/$t.jsonl.gz" "$B/data/superni/tasks/"
  done
  $PY -c "
from transformers import AutoTokenizer
from glora.models.causal import smollm2_folder
AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained('$B/tokenizer')"
  du -sh "$B"
  exit 0
fi

[ -d "$B/wheels" ] || { echo "error: $B/ is missing: run 'bash benchmarks/gpu_check.sh --prepare' here and carry .gpu-check" >&2; exit 2; }
OUT_DIR=${1:-${OUT:-gpu-check-out}}
SITE=${SITE:-/tmp/glora-gpu-site}
mkdir -p "$SITE" "$OUT_DIR"
PY=${PY:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$B"/wheels/*.whl
$PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$B/site.tar.xz" "$SITE"
export PYTHONPATH="$PWD/src:$SITE" GLORA_DATA_DIR="$PWD/$B/data" GLORA_CACHE_DIR=/tmp/glora-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/nvidia-smi.csv" 2>&1 || true
# The model (2 GB) and the run folders stay outside OUT: only the tables come back.
WORK=${WORK:-/tmp/glora-gpu-check}
$PY benchmarks/gpu_check.py --out "$WORK" --tokenizer "$B/tokenizer" --precisions bfloat16,4bit 2>&1 | tee "$OUT_DIR/gpu_check.log"
cp "$WORK/gpu_check.json" "$WORK/gpu_check.md" "$OUT_DIR/"
