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


def write_parts(blob: bytes, out: Path, part_bytes: int, name: str = PART, files: Path | None = None) -> int:
    """``blob`` as parts of at most ``part_bytes`` bytes, ``out/1/name`` ... ``out/N/name``
    (``out`` replaced), ``files`` (a folder, if given) copied to ``out/1/files``, and the
    manifest in ``out/1`` written last, so that a split cut short has none; returns N."""
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes} bytes: the tracked tree leaves no room")
    parts = max(1, math.ceil(len(blob) / part_bytes))
    if out.exists():
        shutil.rmtree(out)
    sizes = []
    for i in range(parts):
        folder = out / str(i + 1)
        folder.mkdir(parents=True)
        chunk = blob[i * part_bytes : (i + 1) * part_bytes]
        (folder / name).write_bytes(chunk)
        sizes.append(len(chunk))
    if files is not None:
        shutil.copytree(files, out / "1" / "files")
    manifest = {"parts": parts, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "sizes": sizes}
    (out / "1" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def manifest_of(parts_dir: Path) -> dict | None:
    """The manifest under ``parts_dir`` (None before part 1 has arrived); ValueError for one
    that cannot be read."""
    path = parts_dir / "1" / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        int(manifest["parts"]), int(manifest["bytes"]), str(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a manifest of parts.py ({e}): carry part 1 again") from None
    return manifest


def missing_parts(parts_dir: Path, name: str = PART) -> list[int]:
    """The part numbers not yet under ``parts_dir`` whole (all of them, as [1], before part 1):
    absent, or of another size than the manifest's (a copy cut short, a part of another split)."""
    manifest = manifest_of(parts_dir)
    if manifest is None:
        return [1]
    sizes = manifest.get("sizes") or [None] * manifest["parts"]
    out = []
    for i, size in enumerate(sizes, start=1):
        part = parts_dir / str(i) / name
        if not part.exists() or (size is not None and part.stat().st_size != size):
            out.append(i)
    return out


def read_parts(parts_dir: Path, name: str = PART, what: str = "the file") -> bytes:
    """The whole, joined from the parts under ``parts_dir`` and checked against the manifest;
    ValueError naming the missing parts or the mismatch (``what`` names the file in it)."""
    missing = missing_parts(parts_dir, name)
    if missing:
        raise ValueError(
            f"parts {missing} of {what} are not whole under {parts_dir}: carry each of them again, one a call"
        )
    manifest = manifest_of(parts_dir)
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
