"""A Flower run config (``[tool.flwr.app.config]`` plus ``flwr run --run-config`` overrides)
as a :class:`~glora.federation.config.RunConfig`, and back.

Flower's config values are TOML scalars, so the mapping is:
- a RunConfig field ``local_steps`` is the key ``local-steps``;
- an optional field (``alpha``, ``local-epochs``, ``max-train-examples``, ...) is unset with
  an empty string ``""`` (``alpha = ""`` is an IID partition);
- ``target-modules`` is a comma-separated string, ``ranks`` a string or an int;
- ``rule-options`` is the body of a TOML inline table: ``"rank = 16, readout_gauge = 'a-normal'"``.
Three keys belong to the Flower layer only: ``out`` (the run folder), ``round-timeout`` and
``node-wait`` (seconds).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glora.federation.config import RunConfig

UNSET = ""


@dataclass(frozen=True)
class FlowerOptions:
    """What the Flower layer adds to a run: where the server writes the results, how long a
    round waits for replies, and how long the server waits for the nodes to connect."""

    out: str = UNSET
    round_timeout: float = 3600.0
    node_wait: float = 600.0

    def folder(self, cfg: RunConfig) -> Path:
        """The run folder: ``out``, or ``runs/flower-<task>-<rule>-<config hash>`` (relative to
        the ServerApp's working directory)."""
        return Path(self.out) if self.out else Path("runs") / f"flower-{cfg.task}-{cfg.rule}-{cfg.identity()}"


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_OPTIONS = {f.name: f for f in dataclasses.fields(FlowerOptions)}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def _convert(name: str, f: dataclasses.Field, value: Any) -> Any:
    """One run-config value as the dataclass field wants it; ValueError naming the key."""
    if value == UNSET and _optional(f):
        return None
    kind = str(f.type).split("|")[0].strip()
    try:
        if name == "rule_options":
            return tomllib.loads(f"options = {{{value}}}")["options"] if value else {}
        if name == "target_modules":
            return tuple(m.strip() for m in str(value).split(",") if m.strip())
        if name == "ranks":
            return str(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError("expected true or false")
            return value
        if kind == "int":
            if isinstance(value, bool) or int(value) != value:
                raise TypeError("expected an integer")
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"run config key {_key(name)!r}: bad value {value!r} ({e})") from None


def from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """The run's RunConfig and Flower options; keys left out keep RunConfig's defaults.
    ValueError for unknown keys or bad values."""
    by_key = {_key(n): (n, f) for n, f in _FIELDS.items()}
    options = {_key(n): (n, f) for n, f in _OPTIONS.items()}
    unknown = sorted(set(run_config) - set(by_key) - set(options))
    if unknown:
        raise ValueError(f"unknown run config keys {unknown}; allowed: {sorted(by_key) + sorted(options)}")
    cfg = {n: _convert(n, f, run_config[k]) for k, (n, f) in by_key.items() if k in run_config}
    opts = {n: _convert(n, f, run_config[k]) for k, (n, f) in options.items() if k in run_config}
    return RunConfig(**cfg), FlowerOptions(**opts)


def to_run_config(cfg: RunConfig, options: FlowerOptions | None = None) -> dict[str, Any]:
    """The flat run config that :func:`from_run_config` reads back as ``cfg`` (and ``options``)."""
    out: dict[str, Any] = {}
    for name, value in dataclasses.asdict(cfg).items():
        if name == "rule_options":
            value = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        elif name == "target_modules":
            value = ",".join(value)
        out[_key(name)] = UNSET if value is None else value
    for name, value in dataclasses.asdict(options or FlowerOptions()).items():
        out[_key(name)] = value
    return out


def run_config_overrides(values: Mapping[str, Any]) -> str:
    """``values`` as the string ``flwr run --run-config`` takes: space-separated TOML
    ``key=value`` pairs."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return "'" + v + "'" if "'" not in v else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise ValueError(f"run config value {v!r}: only bool, int, float and str are allowed")
