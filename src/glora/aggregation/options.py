"""A rule's options, checked and typed against its constructor before anything runs.

Options arrive as text from the command line (``--rule-option restart=False``), as TOML
values from presets, or as Python values. Each is converted to the type the rule's
``__init__`` declares (bool, int, float, a ``Literal`` choice, a torch dtype, ``X | None``),
so that "False" is False rather than a truthy string, and anything else is one ValueError
naming the rule, the option, the value and what is allowed.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any, Literal

import torch

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def convert(value: Any, kind: Any, where: str) -> Any:
    """``value`` as ``kind`` (see the module doc); ValueError saying ``where`` and what is allowed."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None or ((isinstance(value, str) and value.lower() in ("none", "null")) and type(None) in options):
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return convert(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ValueError(f"{where} {value!r}: allowed {', '.join(repr(c) for c in choices)}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{where} {value!r}: give true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{where} {value!r}: give an integer")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} {value!r}: give an integer") from None
    if kind is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # an int is a number already; kept as given (run identities hash the values)
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} {value!r}: give a number") from None
        if isinstance(value, bool) or not math.isfinite(out):
            raise ValueError(f"{where} {value!r}: give a finite number")
        return out
    if kind is torch.dtype:
        if isinstance(value, torch.dtype):
            return value
        dtype = getattr(torch, str(value).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{where} {value!r}: give a floating torch dtype, e.g. float32 or float64")
        return dtype
    return value


def typed_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` converted to the types of ``cls.__init__``'s parameters; ValueError for an
    unknown option or a value of the wrong type."""
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    hints = typing.get_type_hints(cls.__init__, vars(inspect.getmodule(cls)))
    out = {}
    for name, value in options.items():
        if name not in params:
            allowed = ", ".join(params) or "none"
            raise ValueError(f"rule {cls.name!r}: unknown option {name!r}; its options are {allowed}")
        out[name] = convert(value, hints.get(name, Any), f"rule {cls.name!r}: option {name}")
    return out
