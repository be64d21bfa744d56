"""How plain values (a TOML file, the command line, a Flower run config, a saved config.json)
become a RunConfig's: each field's type, its word for None, the task family's defaults, and
rule options whose default changed after runs were recorded."""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any


def none_words(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each field's word for None (:func:`option`'s ``none``, any case) as None.
    ValueError for an empty string there: it once meant IID in the Flower config, and read as
    "not given" it would silently be the default."""
    out = dict(values)
    for f in dataclasses.fields(cls):
        word, value = f.metadata.get("none"), values.get(f.name)
        if word is None or not isinstance(value, str):
            continue
        if value.strip().lower() == word:
            out[f.name] = None
        elif not value.strip():
            raise ValueError(f"option {f.name.replace('_', '-')} is empty: give a value or {word!r}")
    return out


def legacy_options(rule: str) -> dict[str, Any]:
    """The options whose default changed after runs of ``rule`` were recorded, at the value that
    leaving them out meant then (:attr:`Rule.legacy_options`)."""
    from glora.aggregation import RULES

    return dict(getattr(RULES.get(rule), "legacy_options", {}))


def identity_rule_options(rule: str, options: dict[str, Any]) -> dict[str, Any]:
    """The rule options a run's identity hashes: the options as the rule will read them (a
    changed default made explicit, so a run under the new default has a new identity), less
    those at their legacy value (so every run recorded before the change keeps its identity)."""
    legacy = legacy_options(rule)
    effective = effective_rule_options(rule, options)
    return {k: v for k, v in effective.items() if not (k in legacy and v == legacy[k])}


def effective_rule_options(rule: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every option whose default changed (:attr:`Rule.legacy_options`) at the
    value the rule will use: given, or the rule's current default."""
    from glora.aggregation import RULES

    legacy = legacy_options(rule)
    if not legacy:
        return dict(options)
    defaults = inspect.signature(RULES[rule].__init__).parameters
    return {**{k: defaults[k].default for k in legacy}, **options}


def typed_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` converted to the types the dataclass declares (a TOML ``lr = "1e-3"`` is a
    float); ValueError naming the field, the value and the type for one that does not fit."""
    import typing

    from glora.aggregation.options import convert

    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        kind = hints.get(name)
        if kind in (bool, int, float) or typing.get_origin(kind) in (typing.Union, types.UnionType):
            out[name] = convert(value, kind, f"option {name.replace('_', '-')}")
    return out


def task_defaults(task: str, given: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The defaults of ``task``'s family (:attr:`glora.tasks.base.TaskFamily.defaults`) for
    fields not in ``given``; ``eval_every = "rounds"`` there means at the end only (of the
    rounds given, else the family's, else ``rounds``, the dataclass default)."""
    from glora.tasks import task_class

    out = dict(task_class(task).defaults)
    if out.get("eval_every") == "rounds":
        out["eval_every"] = max(1, int(given.get("rounds", out.get("rounds", rounds))))
    return out
