"""peft LoRA state dicts to per-layer :class:`~glora.lowrank.LowRank` updates and back, with
peft's rules for the LoRA scale of each layer.

A peft state dict (``peft.get_peft_model_state_dict``, or an adapter folder's
``adapter_model.safetensors``) holds, per adapted linear layer ``<layer>`` (the module's key,
``base_model.model.`` included):
  ``<layer>.lora_A.weight``  (r, d_in)
  ``<layer>.lora_B.weight``  (d_out, r)
and every other tensor is a ``modules_to_save`` copy (a classification head), under its
module's key with peft's ``modules_to_save.<adapter>`` part removed. The layer's update is
``scale * B @ A`` with peft's scale, lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), where r
and lora_alpha may be set per layer by the config's ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from torch import Tensor

from glora.lowrank import LowRank, numerical_rank

# What peft's PeftModel puts before the adapted model's own module names.
PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<factor>[AB])\.weight")
# Singular values of a dense update below this fraction of the largest are float32 round-off
# (the tolerance of glora.models.lora.export_adapter).
DENSE_RTOL = 1e-7


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key belongs to a LoRA layer (any kind, supported or not)."""
    return ".lora_" in key


def split_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """({layer: (B (d_out, r), A (r, d_in))}, {key: tensor} of the other tensors, the head).

    ValueError for LoRA tensors of a kind this module does not aggregate (DoRA magnitudes,
    embedding or convolution LoRA, LoRA biases), a layer with one factor only, or factors
    that do not multiply."""
    factors: dict[str, dict[str, Tensor]] = {}
    head = {}
    for key, t in state_dict.items():
        m = LORA_KEY.fullmatch(key)
        if m is None:
            if is_lora_key(key):
                raise ValueError(
                    f"tensor {key!r} is not a linear layer's lora_A/lora_B weight: only plain LoRA on linear layers "
                    "is aggregated (no DoRA, LoRA bias, embedding or convolution LoRA)"
                )
            head[key] = t
            continue
        factors.setdefault(m["layer"], {})[m["factor"]] = t
    out = {}
    for layer, f in sorted(factors.items()):
        if set(f) != {"A", "B"}:
            raise ValueError(f"layer {layer!r} has lora_{''.join(f)} but not lora_{'B' if 'A' in f else 'A'}")
        B, A = f["B"], f["A"]
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"layer {layer!r}: lora_B {tuple(B.shape)} and lora_A {tuple(A.shape)} are not (d_out, r) and (r, d_in)"
            )
        out[layer] = (B, A)
    return out, head


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """peft's LoRA scale (``LoraLayer.update_layer``): lora_alpha / r, or lora_alpha / sqrt(r)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def layer_rank_alpha(config: LoraConfig, layer: str) -> tuple[int, float]:
    """(r, lora_alpha) peft gives ``layer``: its ``rank_pattern`` / ``alpha_pattern`` entry,
    matched against the module name as peft's ``LoraModel._create_and_replace`` does, else
    the config's ``r`` / ``lora_alpha``."""
    module = layer.removeprefix(PREFIX)
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return int(r), float(alpha)


def to_lowrank(state_dict: Mapping[str, Tensor], config: LoraConfig) -> tuple[dict[str, LowRank], dict[str, Tensor]]:
    """({layer: LowRank(B, A, the layer's peft scale)}, the head tensors) of an adapter.
    ValueError (see :func:`split_state_dict`) also when a layer's factors are not of the rank
    the config gives that layer."""
    factors, head = split_state_dict(state_dict)
    out = {}
    for layer, (B, A) in factors.items():
        r, alpha = layer_rank_alpha(config, layer)
        if B.shape[1] != r:
            raise ValueError(f"layer {layer!r} has rank {B.shape[1]} but its adapter config gives it r={r}")
        out[layer] = LowRank(B, A, lora_scale(alpha, r, config.use_rslora))
    return out, head


def to_state_dict(factors: Mapping[str, LowRank], head: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The peft state dict of per-layer factors and head tensors (the reverse of
    :func:`to_lowrank`; the scales are the config's business). Contiguous CPU tensors, as
    safetensors and Flower's ArrayRecord take them."""
    out = {}
    for layer, f in factors.items():
        out[f"{layer}.lora_A.weight"] = f.A.detach().cpu().contiguous()
        out[f"{layer}.lora_B.weight"] = f.B.detach().cpu().contiguous()
    out.update({k: t.detach().cpu().contiguous() for k, t in head.items()})
    return out


def balanced(update: LowRank | Tensor) -> LowRank:
    """``update`` as scale-1 factors at its numerical rank q: from its thin SVD
    X diag(sig) Y^T, B = X sqrt(sig) (d_out, q) and A = sqrt(sig) Y^T (q, d_in), in float64.
    Factors in: QR of each and an SVD of the small core (:meth:`LowRank.canonical`), never a
    dense (d_out, d_in) matrix. Dense in: its SVD, singular values below DENSE_RTOL of the
    largest dropped."""
    if isinstance(update, LowRank):
        c = update.canonical(dtype=torch.float64)
        X, sig, Y = c.X, c.sig, c.Y
    else:
        U, S, Vh = torch.linalg.svd(update.double(), full_matrices=False)
        q = numerical_rank(S, DENSE_RTOL)
        X, sig, Y = U[:, :q], S[:q], Vh[:q].T
    root = torch.sqrt(sig)
    return LowRank(X * root, root[:, None] * Y.T, 1.0)


def padded(f: LowRank, rank: int) -> LowRank:
    """``f`` at a larger ``rank``: zero columns of B and zero rows of A, the same update."""
    extra = rank - f.rank
    return LowRank(torch.nn.functional.pad(f.B, (0, extra)), torch.nn.functional.pad(f.A, (0, 0, 0, extra)), f.scale)


def total_factors(updates: Mapping[str, LowRank | Tensor], dtype: torch.dtype) -> dict[str, LowRank]:
    """Per-layer updates as the factors of one peft adapter: balanced (:func:`balanced`),
    padded to the largest numerical rank R (at least 1), in ``dtype``, scale 1 (see
    :func:`total_config`)."""
    factors = {n: balanced(u) for n, u in updates.items()}
    rank = max([1, *(f.rank for f in factors.values())])
    return {n: padded(f, rank).to(dtype) for n, f in factors.items()}


def total_config(template: LoraConfig, rank: int) -> LoraConfig:
    """The config of :func:`total_factors` of rank R: ``template`` (the clients' shared fields:
    base model, task type, target modules, modules_to_save) with r = lora_alpha = R, so the
    scale is 1, and no rank or alpha patterns, no rsLoRA."""
    return dataclasses.replace(template, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
