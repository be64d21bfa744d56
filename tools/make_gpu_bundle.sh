#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) for gpu_lease.sh: what a leased GPU machine (torch there, no
# network, at most 64 MiB of files sent) needs beyond this repo. MiniLM goes in float16
# (90 MB in float32 would not fit; gpu_lease.sh casts it back to float32, so the GPU runs
# use the CPU runs' weights rounded to float16), the SST-2 and CoLA files of the data
# directory, and the transformers and peft versions this project pins, installed into one
# folder and sent as an xz tarball (4 MB against their wheels' 14 MB: the tracked tree grew,
# and with the wheels the whole would pass the 64 MiB limit).
# MPNET=1 also builds .gpu-mpnet/ (git-ignored): MPNet for setting 4 in float16 parts, each
# small enough to travel beside the tracked tree in one call (mpnet_parts.py; the call
# sequence is in results/sweeps/README.md, "Setting 4").
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/minilm .gpu/data/glue
data=${GLORA_DATA_DIR:-../shared/data}
cp -r "$data/glue/sst2" "$data/glue/cola" .gpu/data/glue/
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from glora.models.backbones import minilm_folder

src, dst = minilm_folder(), Path(".gpu/minilm")
for f in src.iterdir():
    if f.is_dir():
        shutil.copytree(f, dst / f.name)
    elif f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
weights = load_file(src / "model.safetensors")
save_file({k: v.half().contiguous() for k, v in weights.items()}, dst / "model16.safetensors", metadata={"format": "pt"})
PY
.venv/bin/python -m pip install -q --no-deps --no-compile --only-binary=:all: --target .gpu/site transformers==5.24.0 peft==0.21.2
tar cf - -C .gpu/site . | xz -9 -T2 > .gpu/site.tar.xz
rm -rf .gpu/site
du -sh .gpu
if [ "${MPNET:-0}" = 1 ]; then
  grep -qx "/.gpu-mpnet/" .git/info/exclude || echo "/.gpu-mpnet/" >> .git/info/exclude
  # what travels with every call: the tracked files and the untracked ones git does not ignore
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
  part=$(( 64 * 1024 * 1024 - tree - 4 * 1024 * 1024 ))  # 4 MiB spare: part 1's small files, a grown tree
  echo "tracked tree $(( tree / 1024 )) KiB: parts of at most $(( part / 1024 )) KiB"
  .venv/bin/python tools/mpnet_parts.py split \
    "$(.venv/bin/python -c 'from glora.models.backbones import mpnet_folder; print(mpnet_folder())')" \
    .gpu-mpnet --part-bytes "$part"
  du -sh .gpu-mpnet/*
fi
