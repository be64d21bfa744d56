"""LoRA on a backbone with one peft adapter per client rank, and factors in and out by layer name.

Clients of a simulated federation train one after another on one shared base model: a
client of rank r uses the peft adapter named ``r{r}``. The trainable non-LoRA parameters
(the classification head) are peft ``modules_to_save`` copies, one per adapter.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from glora.lowrank import LowRank, numerical_rank
from glora.models.export import ExportInfo, describe_adapter


@dataclass(frozen=True)
class LoraSettings:
    """Where LoRA goes and how it is scaled.

    lora_alpha = alpha_per_rank * r, so the PEFT scale alpha / r is the same for every rank
    (2.0 by default); with ``rslora`` the scale is alpha / sqrt(r).
    """

    target_modules: tuple[str, ...] = ("query", "value")
    alpha_per_rank: float = 2.0
    rslora: bool = False
    dropout: float = 0.0
    head_modules: tuple[str, ...] = field(default=("classifier",))

    def alpha(self, rank: int) -> float:
        return self.alpha_per_rank * rank

    def scale(self, rank: int) -> float:
        return self.alpha(rank) / (math.sqrt(rank) if self.rslora else rank)

    def config(self, rank: int) -> LoraConfig:
        # peft takes its "all-linear" shorthand (every linear layer but the output head) only
        # as a plain string, never inside a list.
        targets = "all-linear" if self.target_modules == ("all-linear",) else list(self.target_modules)
        return LoraConfig(
            r=rank,
            lora_alpha=self.alpha(rank),
            target_modules=targets,
            lora_dropout=self.dropout,
            use_rslora=self.rslora,
            modules_to_save=list(self.head_modules) or None,
        )


def _attention_guess(linear: list[str]) -> list[str]:
    """The query and value projections among a backbone's linear layer names, by the names
    the common architectures use (BERT's query/value, MPNet's q/v, Llama's q_proj/v_proj)."""
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["q", "v"], ["q_lin", "v_lin"]):
        if set(pair) <= set(linear):
            return pair
    return ["all-linear"]


def adapter_name(rank: int) -> str:
    return f"r{rank}"


EXPORT_ADAPTER = "export"  # the adapter AdaptedModel.save_adapter adds for a save


def _adapter(key: int | str) -> str:
    """The peft adapter name of a rank, or a name given as such (:data:`EXPORT_ADAPTER`)."""
    return key if isinstance(key, str) else adapter_name(key)


class AdaptedModel:
    """A backbone with LoRA adapters of several ranks on the same frozen base weights."""

    def __init__(self, model: nn.Module, settings: LoraSettings, ranks: Sequence[int]) -> None:
        if not ranks:
            raise ValueError("AdaptedModel needs at least one rank")
        for r in ranks:
            if r < 1:
                raise ValueError(f"LoRA ranks must be >= 1, got {list(ranks)}")
        self.settings = settings
        ranks = sorted(set(ranks))
        try:
            with warnings.catch_warnings():
                # peft asks transformers a deprecated question; nothing for a user to act on.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                self.peft: PeftModel = get_peft_model(
                    model, settings.config(ranks[0]), adapter_name=adapter_name(ranks[0])
                )
        except ValueError as e:
            # peft's message names no alternative; the backbone's own linear layers are the choices.
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"LoRA target modules {list(settings.target_modules)} not found in the backbone, whose linear "
                f"layers are named {linear}: pass --target-modules (target_modules in a preset) with its "
                f"attention projections, e.g. {','.join(_attention_guess(linear))}"
            ) from e
        for r in ranks[1:]:
            self.peft.add_adapter(adapter_name(r), settings.config(r))
        self.ranks = ranks
        self.layers: dict[str, LoraLayer] = {
            _short(name): m for name, m in self.peft.named_modules() if isinstance(m, LoraLayer)
        }
        # A float32 base takes merges into its weights (exactly as merging does). A base in
        # reduced precision or quantized would round them away or cannot hold them: there the
        # merged updates live beside it, float32, added to the layer's output in forward.
        self.exact_base = all(m.base_layer.weight.dtype == torch.float32 for m in self.layers.values())
        if self.exact_base:
            self._original = {n: m.base_layer.weight.detach().clone() for n, m in self.layers.items()}
        else:
            self._offsets: dict[str, Tensor | None] = dict.fromkeys(self.layers)
            for n, m in self.layers.items():
                m.base_layer.register_forward_hook(self._offset_hook(n))

    # -- factors -----------------------------------------------------------------------------
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted layer, from the LoRA layer (a 4-bit base's weight is packed)."""
        return {n: (int(m.out_features), int(m.in_features)) for n, m in self.layers.items()}

    def get_factors(self, rank: int) -> dict[str, LowRank]:
        """The adapter of this rank as LowRank per layer (copies)."""
        a = adapter_name(rank)
        return {
            n: LowRank(_host(m.lora_B[a].weight), _host(m.lora_A[a].weight), float(m.scaling[a]))
            for n, m in self.layers.items()
        }

    def set_factors(self, rank: int | str, factors: Mapping[str, LowRank]) -> None:
        """Write factors into the adapter of this rank (or of that name); their rank and scale
        must be the adapter's."""
        a = _adapter(rank)
        for n, m in self.layers.items():
            f = factors[n]
            if f.rank != m.r[a]:
                raise ValueError(f"layer {n}: factors of rank {f.rank} do not fit the rank-{m.r[a]} adapter")
            if not math.isclose(f.scale, float(m.scaling[a]), rel_tol=1e-6):
                raise ValueError(f"layer {n}: factor scale {f.scale} differs from the adapter's {m.scaling[a]}")
            with torch.no_grad():
                m.lora_B[a].weight.copy_(f.B)
                m.lora_A[a].weight.copy_(f.A)

    # -- head ----------------------------------------------------------------------------------
    def _head_modules(self, rank: int | str) -> dict[str, nn.Module]:
        """The head's modules of the adapter of ``rank`` (or of that adapter name)."""
        a = _adapter(rank)
        out = {}
        for name, m in self.peft.named_modules():
            if type(m).__name__ == "ModulesToSaveWrapper":
                out[_short(name)] = m.modules_to_save[a]
        return out

    def get_head(self, rank: int) -> dict[str, Tensor]:
        return {
            f"{mn}.{pn}": _host(p) for mn, mod in self._head_modules(rank).items() for pn, p in mod.named_parameters()
        }

    def set_head(self, rank: int | str, head: Mapping[str, Tensor]) -> None:
        for mn, mod in self._head_modules(rank).items():
            with torch.no_grad():
                for pn, p in mod.named_parameters():
                    p.copy_(head[f"{mn}.{pn}"])

    # -- export --------------------------------------------------------------------------------
    def save_adapter(
        self,
        folder: Path,
        config: LoraConfig,
        factors: Mapping[str, LowRank],
        head: Mapping[str, Tensor],
        info: ExportInfo | None = None,
    ) -> None:
        """Save ``factors`` and ``head`` as one peft adapter folder of ``config`` (its rank):
        an adapter added beside this model's own for the save and deleted after, so that the
        backbone in memory serves the export (an 8B model is not loaded twice). The model's
        adapters, heads and active adapter are as they were."""
        active = self.peft.active_adapter
        name = EXPORT_ADAPTER
        self.peft.add_adapter(name, config)
        try:
            self.set_factors(name, factors)
            self.set_head(name, head)
            Path(folder).parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=Path(folder).parent, ignore_cleanup_errors=True) as tmp:
                self.peft.save_pretrained(tmp, selected_adapters=[name])
                saved = Path(tmp) / name  # peft writes a non-default adapter into a subfolder named after it
                if info is not None:
                    describe_adapter(saved, self.peft.get_base_model(), self.layers, info)
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(saved, folder)
        finally:
            self.peft.delete_adapter(name)
            self.peft.set_adapter(active)

    # -- training and evaluation ---------------------------------------------------------------
    def activate(self, rank: int, train: frozenset[str] = frozenset({"A", "B"})) -> list[nn.Parameter]:
        """Make the rank-r adapter active; return the LoRA parameters to train (B and/or A)."""
        a = adapter_name(rank)
        self.peft.set_adapter(a)
        params = []
        for m in self.layers.values():
            for factor, holder in (("A", m.lora_A[a]), ("B", m.lora_B[a])):
                holder.weight.requires_grad_(factor in train)
                if factor in train:
                    params.append(holder.weight)
        return params

    def head_parameters(self, rank: int) -> list[nn.Parameter]:
        return [p for mod in self._head_modules(rank).values() for p in mod.parameters()]

    def _offset_hook(self, name: str):
        """Forward hook of a reduced-precision base layer: its output plus x @ offset^T. It
        holds this object weakly: a strong reference would make a cycle (model -> hook ->
        self -> model) that keeps a dropped model in memory until a full garbage collection."""
        owner = weakref.ref(self)

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            me = owner()
            offset = me._offsets[name] if me is not None else None
            if offset is None:
                return output
            return output + nn.functional.linear(inputs[0].to(offset.dtype), offset).to(output.dtype)

        return hook

    def _shift(self, name: str, delta: Tensor) -> None:
        """Add ``delta`` (d_out, d_in) to a layer's float32 offset."""
        w = self.layers[name].base_layer.weight
        d = delta.to(w.device, torch.float32)
        self._offsets[name] = d.clone() if self._offsets[name] is None else self._offsets[name] + d

    def add_to_base(self, merges: Mapping[str, LowRank | Tensor]) -> None:
        """Merge updates into the frozen base, for good (FLoRA, FedEx-LoRA, restarts): into
        a float32 base's weights, beside any other base (never written into it)."""
        if not self.exact_base:
            for n, d in merges.items():
                self._shift(n, d.delta() if isinstance(d, LowRank) else d)
            return
        with torch.no_grad():
            for n, d in merges.items():
                w = self.layers[n].base_layer.weight
                w.add_((d.delta() if isinstance(d, LowRank) else d).to(w.device, w.dtype))

    def base_offsets(self) -> dict[str, Tensor]:
        """What has been merged into each base weight so far (for checkpoints)."""
        if not self.exact_base:
            shapes = self.layer_shapes()
            return {n: (o.cpu() if o is not None else torch.zeros(shapes[n])) for n, o in self._offsets.items()}
        return {n: (m.base_layer.weight.detach() - self._original[n]).cpu() for n, m in self.layers.items()}

    def set_base_offsets(self, offsets: Mapping[str, Tensor]) -> None:
        if not self.exact_base:
            self._offsets = dict.fromkeys(self.layers)
            for n in self.layers:
                self._shift(n, offsets[n])
            return
        with torch.no_grad():
            for n, m in self.layers.items():
                m.base_layer.weight.copy_(self._original[n] + offsets[n].to(self._original[n].device))

    @contextmanager
    def dense_update(
        self, deltas: Mapping[str, Tensor], head_rank: int, head: Mapping[str, Tensor]
    ) -> Iterator[nn.Module]:
        """The model with ``deltas`` added to its base weights, adapters off, and ``head``.

        This is how the global model (base + the state's full update) is evaluated whatever
        the rank of that update; the base weights are restored exactly afterwards.
        """
        exact = self.exact_base
        saved = {n: self.layers[n].base_layer.weight.detach().clone() for n in deltas} if exact else dict(self._offsets)
        self.set_head(head_rank, head)
        self.peft.set_adapter(adapter_name(head_rank))
        try:
            with torch.no_grad():
                for n, d in deltas.items():
                    if not exact:
                        self._shift(n, d)
                        continue
                    w = self.layers[n].base_layer.weight
                    w.add_(d.to(w.device, w.dtype))
            # Only the LoRA layers are switched off: peft's disable_adapter() would also
            # bypass the head copies (modules_to_save) and evaluate the untrained head.
            for m in self.layers.values():
                m.enable_adapters(False)
            yield self.peft
        finally:
            for m in self.layers.values():
                m.enable_adapters(True)
            if not exact:
                self._offsets = saved
            else:
                with torch.no_grad():
                    for n, w in saved.items():
                        self.layers[n].base_layer.weight.copy_(w)


def _host(p: Tensor) -> Tensor:
    """A CPU copy of a parameter: what the server aggregates and checkpoints lives on the host."""
    return p.detach().to("cpu", copy=True)


def _short(name: str) -> str:
    """Layer name without peft's wrapper prefix: 'bert.encoder.layer.0.attention.self.query'."""
    return name.removeprefix("base_model.model.")


def export_adapter(
    folder: Path,
    model: nn.Module | AdaptedModel,
    updates: Mapping[str, Tensor],
    head: Mapping[str, Tensor],
    settings: LoraSettings,
    info: ExportInfo | None = None,
) -> int:
    """Save a total update per layer (dense, relative to the pretrained weights) and the head
    as one peft adapter folder that ``PeftModel.from_pretrained`` loads; with ``info``, one
    that peft and transformers load without glora (:mod:`glora.models.export`: hub id of the
    base, task type, labels, the head's code). Its rank is the largest numerical rank of the
    updates, so the adapter reproduces them up to float32 round-off. Returns that rank. A
    layer narrower than that rank (a grouped-query v_proj beside a full-width q_proj) gets
    zero columns of B and rows of A beyond its width, which add nothing to its update.

    ``model``: the pretrained backbone, or an AdaptedModel that already holds it (a run's own
    model: no second copy of the backbone is loaded, whatever its base weights hold now; the
    export's adapter goes beside the model's own for the save and is removed after)."""
    svds = {n: torch.linalg.svd(d.double(), full_matrices=False) for n, d in updates.items()}
    rank = max(1, max(numerical_rank(S, 1e-7) for _, S, _ in svds.values()))
    scale = settings.scale(rank)
    factors = {}
    for n, (U, S, Vh) in svds.items():
        root = torch.sqrt(S[:rank] / scale)
        pad = rank - root.numel()
        B = torch.nn.functional.pad(U[:, :rank] * root, (0, pad))
        A = torch.nn.functional.pad(root[:, None] * Vh[:rank], (0, 0, 0, pad))
        factors[n] = LowRank(B.float(), A.float(), scale)
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model, settings, [rank])
    adapted.save_adapter(folder, settings.config(rank), factors, head, info)
    return rank
