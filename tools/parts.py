"""A file sent to a leased GPU machine in parts that each fit one call, checked on arrival.

A call to the leased machine sends at most 64 MiB, tracked tree included. ``split`` (here)
writes a file's bytes as N parts, ``OUT/1/NAME`` ... ``OUT/N/NAME``, one carried by each call
to one warm machine, with ``OUT/1/manifest.json`` (the part count, the whole's size and
sha256). ``missing`` (there) says which parts have not arrived; ``join`` (there, once all
have) checks them against the manifest and writes the whole file atomically.

    python tools/parts.py split FILE OUT --part-bytes N [--name NAME]
    python tools/parts.py missing PARTS_DIR [--name NAME]
    python tools/parts.py join PARTS_DIR FILE [--name NAME]

Used by mpnet_parts.py (MPNet's weights) and gpu_superni.sh (SmolLM2 and the SuperNI data).
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
from pathlib import Path

MANIFEST = "manifest.json"
PART = "part"


def write_parts(blob: bytes, out: Path, part_bytes: int, name: str = PART) -> int:
    """``blob`` as parts of at most ``part_bytes`` bytes, ``out/1/name`` ... ``out/N/name``
    (``out`` replaced), with the manifest in ``out/1``; returns N."""
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes} bytes: the tracked tree leaves no room")
    parts = max(1, math.ceil(len(blob) / part_bytes))
    if out.exists():
        shutil.rmtree(out)
    for i in range(parts):
        folder = out / str(i + 1)
        folder.mkdir(parents=True)
        (folder / name).write_bytes(blob[i * part_bytes : (i + 1) * part_bytes])
    manifest = {"parts": parts, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (out / "1" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def missing_parts(parts_dir: Path, name: str = PART) -> list[int]:
    """The part numbers not yet under ``parts_dir`` (all of them, as [1], before part 1)."""
    manifest = parts_dir / "1" / MANIFEST
    if not manifest.exists():
        return [1]
    count = json.loads(manifest.read_text())["parts"]
    return [i for i in range(1, count + 1) if not (parts_dir / str(i) / name).exists()]


def read_parts(parts_dir: Path, name: str = PART, what: str = "the file") -> bytes:
    """The whole, joined from the parts under ``parts_dir`` and checked against the manifest;
    ValueError naming the missing parts or the mismatch (``what`` names the file in it)."""
    missing = missing_parts(parts_dir, name)
    if missing:
        raise ValueError(f"parts {missing} of {what} have not reached {parts_dir}: carry each part in one call")
    manifest = json.loads((parts_dir / "1" / MANIFEST).read_text())
    blob = b"".join((parts_dir / str(i) / name).read_bytes() for i in range(1, manifest["parts"] + 1))
    if len(blob) != manifest["bytes"] or hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise ValueError(
            f"the parts of {what} under {parts_dir} do not match their manifest ({len(blob)} bytes against "
            f"{manifest['bytes']}, or another sha256): make them again and resend every part"
        )
    return blob


def join(parts_dir: Path, target: Path, name: str = PART) -> None:
    """:func:`read_parts` written to ``target`` atomically (a file that exists is whole)."""
    blob = read_parts(parts_dir, name, target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_bytes(blob)
    os.replace(tmp, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="here: a file in parts")
    s.add_argument("file", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--part-bytes", type=int, required=True)
    m = sub.add_parser("missing", help="there: which parts have not arrived yet")
    m.add_argument("parts_dir", type=Path)
    j = sub.add_parser("join", help="there: the parts back into the file, checked")
    j.add_argument("parts_dir", type=Path)
    j.add_argument("target", type=Path)
    for p in (s, m, j):
        p.add_argument("--name", default=PART, help="the part files' name")
    args = parser.parse_args()
    try:
        if args.command == "split":
            n = write_parts(args.file.read_bytes(), args.out, args.part_bytes, args.name)
            print(f"{args.file.name} in {n} parts under {args.out}: carry {args.out}/1 ... {args.out}/{n}, one a call")
        elif args.command == "missing":
            missing = missing_parts(args.parts_dir, args.name)
            print(f"parts not yet in {args.parts_dir}: {missing}" if missing else f"every part is in {args.parts_dir}")
        else:
            join(args.parts_dir, args.target, args.name)
            print(f"joined {args.target}")
    except (ValueError, OSError) as e:
        sys.exit(f"parts.py {args.command}: {e}")


if __name__ == "__main__":
    main()
