"""Where the offline data lives (the tokenisation cache: :mod:`glora.cache`).

The data directory holds the layout of ``shared/data`` (``glue/<task>/<split>.jsonl.gz``);
see that folder's README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "GLORA_DATA_DIR"


def data_dir_candidates() -> list[Path]:
    """The places looked at, in order, when neither an option nor ``GLORA_DATA_DIR`` names one.

    ``../shared/data`` next to the working directory, then next to the repository root
    (``src/glora/data`` -> three parents up), which is where it sits for an editable install.
    """
    repo_root = Path(__file__).resolve().parents[3]
    return [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]


def default_data_dir() -> Path:
    """``GLORA_DATA_DIR`` if set, else the first existing candidate, else the first candidate.

    The last case returns a path that does not exist, so a reader's error can name it.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    candidates = data_dir_candidates()
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    return candidates[0]
