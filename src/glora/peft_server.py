"""The server as a function on peft adapters: the clients' LoRA adapters in (folders or state
dicts, any ranks), one rule's aggregate out as peft adapters, each loadable by
``PeftModel.from_pretrained``.

- ``global``: the rule state's total update of every layer (:meth:`LayerState.total`, merges
  included), as balanced factors at its numerical rank R with scale 1 (r = lora_alpha = R),
  taken from the state's own factors where it keeps them (no dense matrix).
- ``rank-<r>``: what a client of rank r receives, ``readout(r, scale)`` of every layer under
  that client's own adapter config (its ranks, alphas, patterns, rsLoRA), so it trains on from
  there. A rule that merges into the base weights (flora, florist, fedex-lora, glora with
  restart) hands a client that merge plus a fresh adapter; one peft adapter cannot hold a
  change of base weights, so for those rules ``rank-<r>`` holds the total update the client
  then carries (merge + readout, stored like ``global``): right for inference, but not a
  rank-r adapter to train on.
- The head (``modules_to_save`` tensors, e.g. a classifier) is the weighted mean of the
  clients' heads, in every adapter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights
from safetensors.torch import save_file
from torch import Tensor

from glora.aggregation import LayerState, average_params, get_rule, normalize_weights
from glora.lowrank import LowRank
from glora.peft_state import to_lowrank, to_state_dict, total_config, total_factors

# Adapter config fields every client must share: they say which model and modules the
# adapters change, and how an update is applied to a weight.
SHARED_CONFIG = ("base_model_name_or_path", "task_type", "target_modules", "modules_to_save", "fan_in_fan_out")

# A client adapter as a folder, or as a state dict with its config.
AdapterInput = str | os.PathLike | tuple[Mapping[str, Tensor], LoraConfig]


@dataclass(frozen=True)
class ClientAdapter:
    """One client's adapter: ``factors`` {layer: LowRank (d_out, r) x (r, d_in) with its peft
    scale}, ``head`` {key: tensor}, its ``config``, and ``name`` for messages."""

    name: str
    factors: dict[str, LowRank]
    head: dict[str, Tensor]
    config: LoraConfig


def read_adapter(folder: str | os.PathLike) -> tuple[dict[str, Tensor], LoraConfig]:
    """(state dict, LoraConfig) of a peft adapter folder; ValueError when it is not one."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{folder} is not a peft adapter folder (no {CONFIG_NAME})")
    if not any((folder / w).is_file() for w in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise ValueError(f"{folder} has {CONFIG_NAME} but no adapter weights ({SAFETENSORS_WEIGHTS_NAME})")
    return load_peft_weights(str(folder), device="cpu"), LoraConfig.from_pretrained(str(folder))


def client_adapter(item: AdapterInput, index: int) -> ClientAdapter:
    """Client ``index``'s adapter from a folder or a (state dict, LoraConfig) pair."""
    if isinstance(item, str | os.PathLike):
        name = f"client {index} ({item})"
        state_dict, config = read_adapter(item)
    else:
        name = f"client {index}"
        state_dict, config = item
    try:
        factors, head = to_lowrank(state_dict, config)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if not factors:
        raise ValueError(f"{name} holds no LoRA layer (no <layer>.lora_A.weight / .lora_B.weight tensors)")
    return ClientAdapter(name, factors, head, config)


def _comparable(value: Any) -> Any:
    # peft keeps target_modules as a set and modules_to_save as a list that may repeat names
    # (it adds "classifier" and "score" for SEQ_CLS): the same modules, whatever the order.
    return frozenset(value) if isinstance(value, list | set) else value


def _shown(value: Any) -> Any:
    return sorted(set(value)) if isinstance(value, list | set) else value


def check_compatible(clients: Sequence[ClientAdapter]) -> None:
    """ValueError naming the first client, and the first thing, that differs from client 0:
    a shared config field, the adapted layers, a layer's shape, the head's tensors."""
    ref = clients[0]
    for c in clients[1:]:
        for field in SHARED_CONFIG:
            a, b = getattr(ref.config, field), getattr(c.config, field)
            if _comparable(a) != _comparable(b):
                raise ValueError(f"{c.name}: {field} {_shown(b)!r} differs from {ref.name}'s {_shown(a)!r}")
        if set(c.factors) != set(ref.factors):
            only = sorted(set(c.factors) ^ set(ref.factors))[0]
            where = c.name if only in c.factors else ref.name
            raise ValueError(f"{c.name}: adapted layers differ from {ref.name}'s: {only!r} is only in {where}")
        for layer, f in ref.factors.items():
            if c.factors[layer].shape != f.shape:
                raise ValueError(
                    f"{c.name}: layer {layer!r} has shape (d_out, d_in) = {c.factors[layer].shape}, "
                    f"{ref.name}'s is {f.shape}"
                )
        if set(c.head) != set(ref.head):
            only = sorted(set(c.head) ^ set(ref.head))[0]
            raise ValueError(f"{c.name}: head tensors (modules_to_save) differ from {ref.name}'s: {only!r}")
        for key, t in ref.head.items():
            if c.head[key].shape != t.shape:
                raise ValueError(
                    f"{c.name}: head tensor {key!r} has shape {tuple(c.head[key].shape)}, {ref.name}'s is "
                    f"{tuple(t.shape)}"
                )


def readout_names(clients: Sequence[ClientAdapter]) -> list[str]:
    """The name of the readout each client receives. Clients whose layers have the same ranks
    and scales share one: ``rank-<r>`` after their config's r, and ``rank-<r>-client-<i>``
    for a second such group with the same r (another lora_alpha or rank_pattern)."""
    by_layout: dict[tuple, str] = {}
    names = []
    for i, c in enumerate(clients):
        layout = tuple((n, f.rank, f.scale) for n, f in sorted(c.factors.items()))
        if layout not in by_layout:
            name = f"rank-{c.config.r}"
            by_layout[layout] = name if name not in by_layout.values() else f"{name}-client-{i}"
        names.append(by_layout[layout])
    return names


def received_update(state: LayerState, rank: int, scale: float) -> LowRank | Tensor:
    """What a client of this rank and scale carries after a merging state: its merge plus its
    readout, stacked as factors (scale 1, scales folded into A) when the merge is low-rank."""
    merge, readout = state.merge(), state.readout(rank, scale)
    if merge is None:  # a merging rule's layer with nothing to merge (a zero update)
        return readout
    if isinstance(merge, LowRank):
        B = torch.cat([merge.B.double(), readout.B.double()], dim=1)
        A = torch.cat([merge.A.double() * merge.scale, readout.A.double() * readout.scale])
        return LowRank(B, A, 1.0)
    return merge.double() + readout.delta().double()


def aggregate_adapters(
    adapters: Sequence[AdapterInput],
    weights: Sequence[float] | None = None,
    rule: str = "glora",
    **options: Any,
) -> dict[str, Any]:
    """Aggregate client LoRA adapters with a rule, as the server of a federated round does.

    adapters: each a peft adapter folder (str or Path) or a pair (peft state dict, LoraConfig);
        any ranks, ``rank_pattern`` / ``alpha_pattern`` and rsLoRA honoured (each layer's scale
        is peft's). Base model, task type, target modules, modules_to_save and every layer's
        shape must agree (ValueError naming the first client and field that differs).
    weights: one non-negative number per client (e.g. example counts); default equal.
    rule, options: ``glora.get_rule(rule, **options)``.

    Returns a dict:
      ``"adapters"``: {"global": peft state dict, "rank-<r>": peft state dict, ...} (the module
          doc says what each holds; the heads, modules_to_save tensors, are the weighted mean
          of the clients' heads in every one);
      ``"configs"``: {same names: LoraConfig}, the config to save or load each state dict with;
      ``"clients"``: the name of the adapter each client receives, in input order;
      ``"layers"``: {layer: LayerState}, the rule's state (``delta()`` for the dense update).
    :func:`write_adapters` saves the adapters as folders.
    """
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    normalize_weights(weights, len(adapters))  # before reading anything: count, signs, not all zero
    server = get_rule(rule, **options)
    clients = [client_adapter(a, i) for i, a in enumerate(adapters)]
    check_compatible(clients)
    layers = server.aggregate_layers({n: [c.factors[n] for c in clients] for n in clients[0].factors}, weights)
    head = average_params([c.head for c in clients], weights)
    dtype = next(iter(clients[0].factors.values())).dtype
    factors = total_factors({n: s.total() for n, s in layers.items()}, dtype)
    adapters_out = {"global": to_state_dict(factors, head)}
    configs = {"global": total_config(clients[0].config, next(iter(factors.values())).rank)}
    names = readout_names(clients)
    merges = any(s.merge() is not None for s in layers.values())
    for name, c in zip(names, clients, strict=True):
        if name in adapters_out:
            continue
        if merges:
            received = {n: received_update(s, c.factors[n].rank, c.factors[n].scale) for n, s in layers.items()}
            factors = total_factors(received, dtype)
            config = total_config(c.config, next(iter(factors.values())).rank)
        else:
            factors = {n: s.readout(c.factors[n].rank, c.factors[n].scale) for n, s in layers.items()}
            config = c.config
        adapters_out[name] = to_state_dict(factors, head)
        configs[name] = config
    return {"adapters": adapters_out, "configs": configs, "clients": names, "layers": layers}


def save_adapter(folder: Path, state_dict: Mapping[str, Tensor], config: LoraConfig) -> None:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) as peft's
    ``save_pretrained`` writes one, replacing ``folder`` whole once it is complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, ignore_cleanup_errors=True) as tmp:
        config.save_pretrained(tmp)
        save_file(dict(state_dict), Path(tmp) / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)


def write_adapters(out: Path, result: Mapping[str, Any]) -> list[Path]:
    """Save every adapter of an :func:`aggregate_adapters` result as ``out/<name>/``; returns
    the folders."""
    folders = []
    for name, state_dict in result["adapters"].items():
        save_adapter(Path(out) / name, state_dict, result["configs"][name])
        folders.append(Path(out) / name)
    return folders
