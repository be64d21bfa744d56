"""Rows of a JSON Lines file (gzip or plain: the offline GLUE and SuperNI copies, a user's
own file), each kind of damage as one ValueError naming the file, the line and what to do.

A truncated copy otherwise surfaces as a bare ``EOFError``, which the command line reports as
``Aborted.``; a line that is not JSON as a ``JSONDecodeError`` without the file's name; an
empty file as an empty task that fails later, far from its cause.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DAMAGED = "the file is damaged; re-download or fix it"


def read_jsonl(path: Path | str, fields: tuple[str, ...] = (), remedy: str = DAMAGED) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (gzip if its name ends in .gz), one a line, blank
    lines skipped.

    ``fields``: keys every row must have (a row without one is damage too). ``remedy`` ends
    every message: what the reader can do about it. The checks run as the rows are read, so
    a caller that stops early has checked the lines it read.
    """
    path = Path(path)
    line_no, rows = 0, 0
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _row(path, line_no, line, fields, remedy)
                    rows += 1
    except EOFError:
        raise ValueError(
            f"{path}: the gzip stream ends early (truncated file) after line {line_no}; {remedy}"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file after line {line_no} ({e}); {remedy}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text after line {line_no}; {remedy}") from None
    if rows == 0:
        raise ValueError(f"{path}: the file is empty (no rows); {remedy}")


def _row(path: Path, line_no: int, line: str, fields: tuple[str, ...], remedy: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line_no} is not valid JSON ({e.msg}: column {e.colno}); {remedy}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}: line {line_no} is a JSON {type(row).__name__}, not an object; {remedy}")
    missing = [k for k in fields if k not in row]
    if missing:
        raise ValueError(
            f"{path}: line {line_no} has no field {missing[0]!r} (its fields: {', '.join(row) or 'none'}); {remedy}"
        )
    return row
