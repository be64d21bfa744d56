"""Where glora keeps what it builds once and reuses: tokenised datasets (``glora.data``) and
backbones assembled or converted from their packages (``glora.models``). A module of its own
below both, so that neither layer imports the other for it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "GLORA_CACHE_DIR"


def default_cache_dir() -> Path:
    """``GLORA_CACHE_DIR`` if set, else ``./cache`` (gitignored in the repository)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.cwd() / "cache"
