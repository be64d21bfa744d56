"""A run config written out as TOML, generated from RunConfig's field declarations: the
``--config`` file of ``glora run`` (field names, grouped, each with its help) and the
``[tool.flwr.app.config]`` section of a Flower app (dashed keys; glora.flower.config reads it).
``glora config`` prints either; a field added to RunConfig appears in both with no other edit.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

from glora.federation.config import RunConfig


def toml_value(value: Any) -> str:
    """One TOML value: bool, int, float, str, a list of those, or a table of them inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value + "'" if "'" not in value else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"TOML value {value!r}: only bool, int, float, str, lists and tables are allowed")


def run_toml(cfg: RunConfig) -> str:
    """``cfg`` as a ``glora run --config`` file that RunConfig.from_toml reads back as ``cfg``:
    every field under its group's heading, its help as a comment. A field whose value is None
    and has no word for it is commented out (TOML has no null: left out, it takes its default)."""
    lines = [f"# glora run --config FILE: every option of a run ({cfg.task}), with its help."]
    group = None
    for f in dataclasses.fields(cfg):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines += ["", f"# -- {group} " + "-" * max(0, 84 - len(group))]
        lines += [f"# {line}" for line in textwrap.wrap(f.metadata["help"], 88)]
        value = getattr(cfg, f.name)
        if value is None and f.metadata["none"]:
            value = f.metadata["none"]
        if value is None:
            lines.append(f"# {f.name} =  (not set: {f.metadata['default_text'] or 'none'})")
        else:
            lines.append(f"{f.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"
