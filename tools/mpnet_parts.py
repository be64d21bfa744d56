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

Written by hand: no library splits a file for a transfer limit and checks it on arrival.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

WEIGHTS = "model.safetensors"
PART = "model16.part"
MANIFEST = "manifest.json"


def split(model_dir: Path, out: Path, part_bytes: int) -> int:
    """Write ``model_dir``'s weights in float16 as parts of at most ``part_bytes`` bytes under
    ``out/1`` ... ``out/N`` (its other files in ``out/1/files``, the manifest in ``out/1``); returns N."""
    import torch
    from safetensors.torch import load_file, save

    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes} bytes: the tracked tree leaves no room")
    weights = load_file(model_dir / WEIGHTS)
    blob = save({k: v.to(torch.float16).contiguous() for k, v in weights.items()}, metadata={"format": "pt"})
    parts = math.ceil(len(blob) / part_bytes)
    if out.exists():
        shutil.rmtree(out)
    for i in range(parts):
        folder = out / str(i + 1)
        folder.mkdir(parents=True)
        (folder / PART).write_bytes(blob[i * part_bytes : (i + 1) * part_bytes])
    files = out / "1" / "files"
    shutil.copytree(model_dir, files, ignore=shutil.ignore_patterns(WEIGHTS))
    manifest = {"parts": parts, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (out / "1" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def missing_parts(parts_dir: Path) -> list[int]:
    """The part numbers not yet under ``parts_dir`` (all of them, as [1], before part 1)."""
    manifest = parts_dir / "1" / MANIFEST
    if not manifest.exists():
        return [1]
    count = json.loads(manifest.read_text())["parts"]
    return [i for i in range(1, count + 1) if not (parts_dir / str(i) / PART).exists()]


def join(parts_dir: Path, target: Path) -> None:
    """Check the parts under ``parts_dir`` against the manifest and write the float32 model
    folder at ``target`` (atomically: a folder that exists is whole). ValueError naming the
    missing parts, or the mismatch, otherwise."""
    import torch
    from safetensors.torch import load, save_file

    missing = missing_parts(parts_dir)
    if missing:
        raise ValueError(
            f"MPNet parts {missing} have not reached {parts_dir}: carry .gpu-mpnet/<part> in one call each "
            "(RECEIVE=1 bash tools/gpu_lease.sh), then run the lease"
        )
    manifest = json.loads((parts_dir / "1" / MANIFEST).read_text())
    blob = b"".join((parts_dir / str(i) / PART).read_bytes() for i in range(1, manifest["parts"] + 1))
    if len(blob) != manifest["bytes"] or hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise ValueError(
            f"MPNet parts under {parts_dir} do not match their manifest ({len(blob)} bytes against "
            f"{manifest['bytes']}, or another sha256): make the bundle again and resend every part"
        )
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
            missing = missing_parts(args.parts_dir)
            print(f"MPNet parts not yet in {args.parts_dir}: {missing}" if missing else "every MPNet part is here")
        else:
            join(args.parts_dir, args.target)
            print(f"MPNet assembled at {args.target}")
    except ValueError as e:
        sys.exit(f"mpnet_parts.py {args.command}: {e}")


if __name__ == "__main__":
    main()
