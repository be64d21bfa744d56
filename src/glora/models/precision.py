"""How the frozen base model is held: its dtype (float32, bfloat16, float16) or a 4-/8-bit
quantization (bitsandbytes: NF4 with double quantization and bfloat16 compute for 4 bits, as
QLoRA does). The LoRA factors and the head stay float32 whatever the base (peft upcasts
adapter weights; glora's heads are float32), and the server's math keeps its own dtype.
A base that is not float32 is never written into: what merge rules merge lives beside it
(glora.models.lora.AdaptedModel's offsets).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

DTYPES = ("float32", "bfloat16", "float16")


def check_precision(dtype: str, load_in_4bit: bool, load_in_8bit: bool, device: str) -> None:
    """ValueError naming the option and what is missing, before anything loads."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose {', '.join(DTYPES)}")
    if load_in_4bit and load_in_8bit:
        raise ValueError("--load-in-4bit and --load-in-8bit exclude each other: choose one")
    if load_in_4bit or load_in_8bit:
        option = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"
        missing = []
        if importlib.util.find_spec("bitsandbytes") is None:
            missing.append("the bitsandbytes package (pip install bitsandbytes)")
        if not torch.cuda.is_available() or device == "cpu":
            missing.append("a CUDA GPU (this process sees none, or --device is cpu)")
        if missing:
            raise ValueError(f"{option} quantizes the base with bitsandbytes and needs {' and '.join(missing)}")


def loading_kwargs(dtype: str, load_in_4bit: bool = False, load_in_8bit: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` for the base's dtype or quantization."""
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig

        config = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            if load_in_4bit
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        return {"quantization_config": config, "dtype": torch.bfloat16}
    return {"dtype": getattr(torch, dtype)}
