"""A Hugging Face hub cache made from local model folders, for offline tests of code paths
that name a model by its hub id (what a user online would run): huggingface_hub resolves
``org/name`` from ``$HF_HUB_CACHE/models--org--name/snapshots/<commit>/`` when offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

COMMIT = "0" * 40


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Make ``repo_id`` resolve to the files of ``folder`` (symlinked) in the hub cache ``cache``."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for f in Path(folder).iterdir():
        if f.is_file() and not (snapshot / f.name).exists():
            (snapshot / f.name).symlink_to(f.resolve())


def offline_env(cache: Path, tmp: Path) -> dict[str, str]:
    """The environment of a process that sees ``cache`` as its hub cache and nothing online."""
    return {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(Path(tmp) / "hf_modules"),
        "TRANSFORMERS_VERBOSITY": "error",
    }


# Run first in a process that must work without glora: `import glora` then raises ImportError.
BLOCK_GLORA = "import sys\nsys.modules['glora'] = None\n"


def run_without_glora(code: str, cache: Path, tmp: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python where importing glora fails; output captured."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK_GLORA + code],
        env=offline_env(cache, tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
