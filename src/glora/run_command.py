"""The ``glora run`` command, generated from the RunConfig dataclass.

Every RunConfig field becomes one option (``local_steps`` is ``--local-steps``), in the help
panel of its group, with its help text and its default (and each task family's own default
where it differs, e.g. ``superni: 5``). A field added to RunConfig is an option here with no
other edit. The command's own options: ``--config`` (a TOML file of fields), ``--out``,
``--resume`` and ``--progress``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from glora.federation.config import OUTPUT, RunConfig, none_words

# What the command does with the resolved config: (cfg, folder, resume, progress) -> None.
Execute = Callable[[RunConfig, Path, bool, bool], None]


def shown_value(value: Any, word: str | None = None) -> str:
    """A field's value as the CLI and TOML spell it."""
    if value is None:
        return word or "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value) if value != "" else "none"


def family_defaults(f: dataclasses.Field) -> str:
    """The task families whose default of field ``f`` differs from the dataclass's, as help
    shows them: "superni, instructions: 5"."""
    from glora.tasks import FAMILIES, family_class

    base = f.default_factory() if f.default is dataclasses.MISSING else f.default
    by_value: dict[str, list[str]] = {}
    for family in FAMILIES:
        defaults = family_class(family).defaults
        if f.name in defaults and defaults[f.name] != base:
            value = defaults[f.name]
            text = "rounds" if f.name == "eval_every" and value == "rounds" else shown_value(value, f.metadata["none"])
            by_value.setdefault(text, []).append(family)
    return "; ".join(f"{', '.join(families)}: {text}" for text, families in by_value.items())


def field_help(f: dataclasses.Field) -> str:
    """A field's help text with its default(s)."""
    meta = f.metadata
    base = f.default_factory() if f.default is dataclasses.MISSING else f.default
    shown = meta["default_text"] or shown_value(base, meta["none"])
    per_family = family_defaults(f)
    note = "" if meta["identity"] else " Not part of the run's identity."
    return f"{meta['help']}{note} [default: {shown}{'; ' + per_family if per_family else ''}]"


def field_parameter(f: dataclasses.Field, kind: Any) -> inspect.Parameter:
    """The typer option of one RunConfig field. Every option defaults to None ("not given"),
    so that the --config file and the task's defaults fill what the command line leaves out."""
    flag = "--" + f.name.replace("_", "-")
    common = {"help": field_help(f), "rich_help_panel": f.metadata["group"], "envvar": f.metadata["envvar"]}
    if typing.get_origin(kind) is dict:
        # A mapping is given one key=value at a time (--rule-option rank=16 --rule-option ...).
        singular = flag.removesuffix("s")
        return inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option([], singular, **common), annotation=list[str]
        )
    args = [a for a in typing.get_args(kind) if a is not type(None)] if _optional(kind) else [kind]
    base = args[0] if len(args) == 1 else str
    if base is bool:
        option = typer.Option(None, f"{flag}/--no-{flag[2:]}", **common)
    else:
        if f.metadata["none"] or typing.get_origin(base) is tuple:
            base = str  # "iid", "all", "query,value": converted by RunConfig.from_dict
        option = typer.Option(None, flag, **common)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=base | None)


def _optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def given_values(cls: type[RunConfig], options: dict[str, Any]) -> dict[str, Any]:
    """The fields given on the command line, as RunConfig.from_dict reads them."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in options.items():
        if typing.get_origin(hints[name]) is dict:
            if value:
                out[name] = parse_key_values(value, "--" + name.replace("_", "-").removesuffix("s"))
        elif value is not None:
            out[name] = value
    return out


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``["rank=16", "restart=false"]`` as a dict, values read as JSON where they parse."""
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"{flag} {item!r}: write key=value, e.g. {flag} rank=16")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(text.strip())
        except json.JSONDecodeError:
            out[key.strip()] = text.strip()
    return out


def resolve(cls: type[RunConfig], config: Path | None, options: dict[str, Any]) -> RunConfig:
    """The run's config: the TOML file's fields, the command line's on top (a mapping such as
    rule_options merges key by key), then the task's defaults for what neither sets."""
    values = none_words(cls, cls.read_toml(config)) if config else {}
    for name, value in given_values(cls, options).items():
        values[name] = {**values.get(name, {}), **value} if isinstance(value, dict) else value
    if values.get("dataset") and "task" not in values:
        # Your own data: the columns given say which kind of task it is.
        values["task"] = "instructions" if values.get("response_column") else "classification"
    return cls.from_dict(values)


def run_command(cls: type[RunConfig], execute: Execute) -> Callable[..., None]:
    """The ``glora run`` callback for the fields of ``cls``: typer reads its signature."""
    hints = typing.get_type_hints(cls)
    fields = [field_parameter(f, hints[f.name]) for f in dataclasses.fields(cls)]
    own = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", help="TOML file of run options; command-line options override it."),
            annotation=Path | None,
        ),
        inspect.Parameter(
            "out",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None, "--out", help="Run folder. [default: runs/TASK-RULE-CONFIGHASH]", rich_help_panel=OUTPUT
            ),
            annotation=Path | None,
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                False,
                "--resume",
                help="Continue an interrupted run in --out from its last checkpoint.",
                rich_help_panel=OUTPUT,
            ),
            annotation=bool,
        ),
        inspect.Parameter(
            "progress",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(True, help="Progress bars.", rich_help_panel=OUTPUT),
            annotation=bool,
        ),
    ]

    def command(config: Path | None, out: Path | None, resume: bool, progress: bool, **options: Any) -> None:
        from rich.console import Console

        try:
            cfg = resolve(cls, config, options)
            folder = out or Path("runs") / f"{cfg.task}-{cfg.rule}-{cfg.identity()}"
            execute(cfg, folder, resume, progress)
        except (ValueError, FileNotFoundError) as e:
            Console(stderr=True).print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None

    command.__signature__ = inspect.Signature(own[:1] + fields + own[1:])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in own + fields}
    command.__doc__ = (
        "Federated LoRA fine-tuning: a task, a rule and a federation in; a trained global adapter, "
        "per-round metrics and a summary table out."
    )
    return command
