"""Server aggregation rules, one module each, registered by name.

Adding a rule: a new module with a :class:`Rule` subclass, and one line in ``RULES``.
"""

from __future__ import annotations

from glora.aggregation.base import ClientPlan, LayerState, Rule, normalize_weights
from glora.aggregation.fedex import FedExLoRA
from glora.aggregation.fedit import FedIT
from glora.aggregation.fedsa import FedSALoRA
from glora.aggregation.ffa import FFALoRA
from glora.aggregation.flexlora import FlexLoRA
from glora.aggregation.flora import FLoRA
from glora.aggregation.florist import FLoRIST
from glora.aggregation.glora import GLoRA
from glora.aggregation.hetlora import HetLoRA
from glora.aggregation.options import typed_options
from glora.aggregation.params import average_params
from glora.aggregation.reference import Centralized, CentralizedSteps, LocalOnly
from glora.aggregation.rolora import RoLoRA

RULES: dict[str, type[Rule]] = {
    "glora": GLoRA,
    "fedit": FedIT,
    "ffa-lora": FFALoRA,
    "flora": FLoRA,
    "flexlora": FlexLoRA,
    "hetlora": HetLoRA,
    "fedex-lora": FedExLoRA,
    "fedsa-lora": FedSALoRA,
    "rolora": RoLoRA,
    "florist": FLoRIST,
    "centralized": Centralized,
    "centralized-steps": CentralizedSteps,
    "local": LocalOnly,
}


def get_rule(name: str, **options) -> Rule:
    """The rule registered as ``name``, built with its keyword options, each converted to the
    type the rule declares (``"False"`` is False); ValueError for unknown options or values."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; available rules: {', '.join(sorted(RULES))}") from None
    return cls(**typed_options(cls, options))


__all__ = ["RULES", "ClientPlan", "LayerState", "Rule", "average_params", "get_rule", "normalize_weights"]
