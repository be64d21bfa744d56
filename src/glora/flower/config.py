"""A Flower run config (``[tool.flwr.app.config]`` plus ``flwr run --run-config`` overrides)
as a :class:`~glora.federation.config.RunConfig`, and back, generated from RunConfig's fields.

Flower's config values are TOML scalars, so the mapping is:
- a RunConfig field ``local_steps`` is the key ``local-steps``;
- ``""`` is "not given": the field takes its default (``head-lr = ""``: lr x head-lr-ratio);
  a field whose None has a word spells it as the CLI and TOML do (``alpha = "iid"``,
  ``superni-eval-tasks = "all"``);
- ``target-modules`` is a comma-separated string, ``ranks`` a string or an int;
- ``rule-options`` is the body of a TOML inline table: ``"rank = 16, readout_gauge = 'a-normal'"``.
Four keys belong to the Flower layer only: ``out`` (the run folder), ``round-timeout`` and
``node-wait`` (seconds), and ``resume`` (continue ``out`` from its last checkpoint).
:func:`flower_toml` writes the section that pyproject.toml carries.
"""

from __future__ import annotations

import dataclasses
import textwrap
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glora.aggregation.options import convert
from glora.federation.config import RunConfig
from glora.federation.config_template import toml_value

UNSET = ""


@dataclass(frozen=True)
class FlowerOptions:
    """What the Flower layer adds to a run: where the server writes the results, how long a
    round waits for replies, how long the server waits for the nodes to connect, and whether
    it continues the run folder's last checkpoint."""

    out: str = field(
        default=UNSET,
        metadata={
            "help": "The run folder. Default runs/flower-<task>-<rule>-<hash> under the SuperLink's working directory."
        },
    )
    # A node's share of a round (round time over clients) is at most 339 s in 99.9% of the
    # 7,179 rounds recorded under results/ (this CPU, MiniLM and SmolLM2; the slowest are the
    # pooled reference's): 900 s leaves room without letting one stalled node hold a round for
    # an hour. Raise it for larger models.
    round_timeout: float = field(
        default=900.0,
        metadata={"help": "Seconds a round waits for replies (raise it for models slower than MiniLM on a CPU)."},
    )
    node_wait: float = field(
        default=600.0, metadata={"help": "Seconds the server waits for `clients` nodes to connect."}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the run in `out` from its last checkpoint (after the SuperLink or the ServerApp died)."
        },
    )

    def folder(self, cfg: RunConfig) -> Path:
        """The run folder: ``out``, or ``runs/flower-<task>-<rule>-<config hash>`` (relative to
        the ServerApp's working directory)."""
        return Path(self.out) if self.out else Path("runs") / f"flower-{cfg.task}-{cfg.rule}-{cfg.identity()}"


# What the app's pyproject.toml declares: a quick two-node run on a laptop.
EXAMPLE = RunConfig(
    clients=2,
    ranks="4,8",
    rounds=3,
    lr=0.002,
    eval_every=1,
    max_train_examples=2000,
    max_eval_examples=256,
    threads=1,
)


def _key(name: str) -> str:
    return name.replace("_", "-")


def from_run_config(run_config: Mapping[str, Any], cls: type[RunConfig] = RunConfig) -> tuple[RunConfig, FlowerOptions]:
    """The run's config and Flower options; keys left out (or ``""``) take their defaults, as
    on the command line. ValueError for unknown keys or bad values."""
    fields = {_key(f.name): f for f in dataclasses.fields(cls)}
    options = {_key(f.name): f for f in dataclasses.fields(FlowerOptions)}
    unknown = sorted(set(run_config) - set(fields) - set(options))
    if unknown:
        raise ValueError(f"unknown run config keys {unknown}; allowed: {sorted(fields) + sorted(options)}")
    values: dict[str, Any] = {}
    for key, f in fields.items():
        value = run_config.get(key, UNSET)
        if key not in run_config or (value == UNSET and not f.metadata["none"]):
            continue  # not given; a field with a word for None refuses "" in RunConfig.from_dict
        if key == "rule-options":
            try:
                value = tomllib.loads(f"options = {{{value}}}")["options"]
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"run config key 'rule-options': bad value {value!r} ({e})") from None
        values[f.name] = value
    declared = typing.get_type_hints(cls)
    for name, value in values.items():
        # flwr parses "fraction=1" as an int; the command line's float option gives 1.0 for the
        # same run, and a run's identity hashes the value: a number is a float where one is declared.
        if float in (declared[name], *typing.get_args(declared[name])) and type(value) is int:
            values[name] = float(value)
    try:
        cfg = cls.from_dict(values)
    except ValueError as e:
        raise ValueError(f"run config: {e}") from None
    hints = typing.get_type_hints(FlowerOptions)
    opts = {
        f.name: convert(run_config[k], hints[f.name], f"run config key {k!r}")
        for k, f in options.items()
        if run_config.get(k, UNSET) != UNSET
    }
    return cfg, FlowerOptions(**opts)


def to_run_config(cfg: RunConfig, options: FlowerOptions | None = None) -> dict[str, Any]:
    """The flat run config that :func:`from_run_config` reads back as ``cfg`` (and ``options``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, dict):
            value = toml_value(value)[1:-1]
        elif isinstance(value, tuple):
            value = ",".join(value)
        elif value is None:
            value = f.metadata["none"] or UNSET
        out[_key(f.name)] = value
    for name, value in dataclasses.asdict(options or FlowerOptions()).items():
        out[_key(name)] = value
    return out


def flower_toml(cfg: RunConfig = EXAMPLE, options: FlowerOptions | None = None) -> str:
    """The ``[tool.flwr.app.config]`` section of ``cfg``, each key with its help: what
    pyproject.toml carries (flwr refuses overrides of keys it does not declare)."""
    fields = [*dataclasses.fields(cfg), *dataclasses.fields(FlowerOptions)]
    helps = {_key(f.name): f.metadata["help"] for f in fields}
    lines = ["[tool.flwr.app.config]"]
    for key, value in to_run_config(cfg, options).items():
        lines += [f"# {line}" for line in textwrap.wrap(helps[key], 98)] + [f"{key} = {toml_value(value)}"]
    return "\n".join(lines) + "\n"


def run_config_overrides(values: Mapping[str, Any]) -> str:
    """``values`` as the string ``flwr run --run-config`` takes: space-separated TOML
    ``key=value`` pairs."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())
