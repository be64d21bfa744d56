"""Server aggregation rules, one module each, registered by name.

Adding a rule: a new module with a :class:`Rule` subclass, and one line in ``RULES``.
"""

from __future__ import annotations

from glora.aggregation.base import ClientPlan, LayerState, Rule, normalize_weights
from glora.aggregation.fedit import FedIT
from glora.aggregation.glora import GLoRA
from glora.aggregation.params import average_params

RULES: dict[str, type[Rule]] = {
    "glora": GLoRA,
    "fedit": FedIT,
}


def get_rule(name: str, **options) -> Rule:
    """The rule registered as ``name``, built with its keyword options."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; available rules: {', '.join(sorted(RULES))}") from None
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"rule {name!r}: bad options {sorted(options)}: {e}") from None


__all__ = ["RULES", "ClientPlan", "LayerState", "Rule", "average_params", "get_rule", "normalize_weights"]
