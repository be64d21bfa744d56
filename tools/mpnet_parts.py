"""MPNet for a leased GPU machine, sent in parts that each fit one call (setting 4).

A call to the leased machine sends at most 64 MiB, tracked tree included; MPNet's weights are
220 MB even in float16. ``split`` (here, from make_gpu_bundle.sh with MPNET=1) writes them in
float16 as N parts, folders ``.gpu-mpnet/1`` ... ``.gpu-mpnet/N``, one carried by each call to
one warm machine; part 1 also holds the model folder's small files (config, tokenizer) and
``manifest.json`` (the part count, the float16 file's size and sha256). ``join`` (there, from
gpu_lease.sh, once every part has arrived) checks the parts against the manifest and writes
the model folder in float32 where the backbone name "mpnet" resolves
(``$GLORA_CACHE_DIR/backbones/all-mpnet-base-v2``), so the runs' configs and identities are
those of the CPU runs; their weights are the CPU runs' rounded to float16.

The parts themselves are parts.py's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # parts.py, beside this file
from parts import missing_parts, read_parts, write_parts

WEIGHTS = "model.safetensors"
PART = "model16.part"


def split(model_dir: Path, out: Path, part_bytes: int) -> int:
    """Write ``model_dir``'s weights in float16 as parts of at most ``part_bytes`` bytes under
    ``out/1`` ... ``out/N`` (its other files in ``out/1/files``, the manifest in ``out/1``); returns N."""
    import torch
    from safetensors.torch import load_file, save

    if part_bytes <= 0:  # before minutes of loading and converting
        raise ValueError(f"part size must be positive, got {part_bytes} bytes: the tracked tree leaves no room")
    weights = load_file(model_dir / WEIGHTS)
    blob = save({k: v.to(torch.float16).contiguous() for k, v in weights.items()}, metadata={"format": "pt"})
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "files"
        shutil.copytree(model_dir, files, ignore=shutil.ignore_patterns(WEIGHTS))
        return write_parts(blob, out, part_bytes, PART, files)


def missing(parts_dir: Path) -> list[int]:
    """The MPNet part numbers not yet under ``parts_dir``."""
    return missing_parts(parts_dir, PART)


def join(parts_dir: Path, target: Path) -> None:
    """Check the parts under ``parts_dir`` against the manifest and write the float32 model
    folder at ``target`` (atomically: a folder that exists is whole). ValueError naming the
    missing parts, or the mismatch, otherwise."""
    import torch
    from safetensors.torch import load, save_file

    if missing(parts_dir):
        raise ValueError(
            f"MPNet parts {missing(parts_dir)} have not reached {parts_dir}: carry .gpu-mpnet/<part> in one call "
            "each (RECEIVE=1 bash tools/gpu_lease.sh), then run the lease"
        )
    blob = read_parts(parts_dir, PART, "MPNet")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(parts_dir / "1" / "files", folder)
        save_file({k: v.to(torch.float32) for k, v in load(blob).items()}, folder / WEIGHTS, metadata={"format": "pt"})
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="here: MPNet's weights in float16, in parts")
    s.add_argument("model_dir", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--part-bytes", type=int, required=True)
    m = sub.add_parser("missing", help="there: which parts have not arrived yet")
    m.add_argument("parts_dir", type=Path)
    j = sub.add_parser("join", help="there: the parts back into a float32 model folder")
    j.add_argument("parts_dir", type=Path)
    j.add_argument("target", type=Path)
    args = parser.parse_args()
    try:
        if args.command == "split":
            n = split(args.model_dir, args.out, args.part_bytes)
            print(f"MPNet in {n} parts under {args.out}: carry {args.out}/1 ... {args.out}/{n}, one a call")
        elif args.command == "missing":
            left = missing(args.parts_dir)
            print(f"MPNet parts not yet in {args.parts_dir}: {left}" if left else "every MPNet part is here")
        else:
            join(args.parts_dir, args.target)
            print(f"MPNet assembled at {args.target}")
    except ValueError as e:
        sys.exit(f"mpnet_parts.py {args.command}: {e}")


if __name__ == "__main__":
    main()
