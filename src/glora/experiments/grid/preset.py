"""Presets: named grids of runs, read from TOML.

A preset is a base config and four axes: tasks (each with its own overrides, e.g. the
task's tuned learning rate), settings (named config overrides, e.g. ``alpha = 0.1``),
rules and seeds. Expanding it gives one :class:`PlannedRun` per distinct resolved config;
labels (task, setting, rule, seed) say where each run sits in the report's tables.

The packaged presets live in ``glora/experiments/grid/presets/*.toml``; any other TOML file of
the same shape can be given by path. Keys of a preset file::

    name, description            # strings (name defaults to the file name)
    rules = [...]                # every rule runs in every setting, unless a setting says otherwise
    seeds = [0, 1, 2]
    [base]                       # RunConfig fields shared by every run
    [tasks.<task>]               # a task of the grid and its overrides (may be empty), plus one
                                 #   optional key: lr_task = "<task>" (with --lr-from, this task
                                 #   takes the rates the tuning sweep chose for that task)
    [settings.<label>]           # a setting: RunConfig overrides, plus three optional keys:
                                 #   rules = [...] (only these rules in this setting), note = "...",
                                 #   versus = "<setting>" (a variant of that setting: the report
                                 #   compares the two columns seed by seed)
    [rule_options.<rule>]        # options of one rule, in every setting
    [cost]                       # for time estimates: see glora.experiments.grid.estimate.CostModel

``alpha = "iid"`` stands for an IID partition (TOML has no null).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from glora.aggregation import RULES
from glora.experiments.grid.estimate import CostModel, estimate_seconds
from glora.federation.checks import check_config
from glora.federation.config import RunConfig

PRESETS_PACKAGE = "glora.experiments.grid"  # the package whose presets/ folder holds the packaged presets
_PRESET_KEYS = {"name", "description", "rules", "seeds", "base", "tasks", "settings", "rule_options", "cost"}


@dataclass(frozen=True)
class Setting:
    """One named column of a table: config overrides, optionally for some rules only."""

    name: str
    overrides: dict[str, Any]
    rules: tuple[str, ...] | None = None
    note: str = ""
    versus: str | None = None  # the setting this one is a variant of (same splits, one change)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    source: str
    base: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    settings: dict[str, Setting]
    rules: tuple[str, ...]
    seeds: tuple[int, ...]
    rule_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    cost: CostModel = field(default_factory=CostModel)
    # {task: the task whose tuned rates it takes under --lr-from}, where it is not its own.
    lr_tasks: dict[str, str] = field(default_factory=dict)

    def all_rules(self) -> tuple[str, ...]:
        """Every rule of the grid, in the preset's order (preset rules first, then settings')."""
        out = list(self.rules)
        for s in self.settings.values():
            out += [r for r in s.rules or () if r not in out]
        return tuple(out)


@dataclass(frozen=True)
class Label:
    """Where a run sits in the report: a cell (task, setting, rule) and its seed."""

    task: str
    setting: str
    rule: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "setting": self.setting, "rule": self.rule, "seed": self.seed}


@dataclass
class PlannedRun:
    """One distinct run of a grid; several labels when settings coincide for it."""

    config: RunConfig
    labels: list[Label]
    estimate_seconds: float

    @property
    def identity(self) -> str:
        return self.config.identity()


def packaged_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files(PRESETS_PACKAGE).joinpath("presets")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A packaged preset by name, or a preset TOML file by path. ValueError if neither."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ValueError(f"preset file {path} does not exist; give a TOML file or one of {packaged_presets()}")
        text, source = path.read_text(), str(path)
    else:
        res = resources.files(PRESETS_PACKAGE).joinpath("presets", f"{name_or_path}.toml")
        if not res.is_file():
            raise ValueError(
                f"unknown preset {str(name_or_path)!r}: give a path to a TOML file or one of {packaged_presets()}"
            )
        text, source = res.read_text(), f"glora/experiments/grid/presets/{name_or_path}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"preset {source}: not valid TOML: {e}") from None
    return parse_preset(data, source, default_name=path.stem)


def parse_preset(data: dict[str, Any], source: str, default_name: str = "preset") -> Preset:
    """A :class:`Preset` from the parsed TOML of a preset file."""
    unknown = sorted(set(data) - _PRESET_KEYS)
    if unknown:
        raise ValueError(f"preset {source}: unknown keys {unknown}; allowed: {sorted(_PRESET_KEYS)}")
    for key in ("rules", "seeds", "tasks", "settings"):
        if not data.get(key):
            raise ValueError(f"preset {source}: '{key}' is missing or empty; a grid needs at least one")
    settings = {}
    for label, body in data["settings"].items():
        body = dict(body)
        rules = body.pop("rules", None)
        note = body.pop("note", "")
        versus = body.pop("versus", None)
        if versus is not None and (versus not in data["settings"] or versus == label):
            raise ValueError(
                f"preset {source}: setting {label!r} has versus = {versus!r}, which names no other setting; "
                f"settings: {', '.join(data['settings'])}"
            )
        settings[label] = Setting(label, body, tuple(rules) if rules is not None else None, note, versus)
    rules = tuple(data["rules"])
    for rule in rules + tuple(r for s in settings.values() for r in s.rules or ()):
        if rule not in RULES:
            raise ValueError(f"preset {source}: unknown rule {rule!r}; available rules: {', '.join(sorted(RULES))}")
    seeds = tuple(data["seeds"])
    if not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"preset {source}: seeds must be integers, got {list(seeds)}")
    tasks = {t: dict(v) for t, v in data["tasks"].items()}
    lr_tasks = {t: body.pop("lr_task") for t, body in tasks.items() if "lr_task" in body}
    for t, other in lr_tasks.items():
        if not isinstance(other, str) or not other:
            raise ValueError(
                f"preset {source}: tasks.{t}.lr_task names the task whose tuned rates {t} takes, e.g. "
                f'"sst2"; got {other!r}'
            )
    return Preset(
        name=data.get("name", default_name),
        description=data.get("description", ""),
        source=source,
        base=dict(data.get("base", {})),
        tasks=tasks,
        settings=settings,
        rules=rules,
        seeds=seeds,
        rule_options={r: dict(v) for r, v in data.get("rule_options", {}).items()},
        cost=CostModel.from_dict(data.get("cost", {}), source),
        lr_tasks=lr_tasks,
    )


def _pick(name: str, chosen: list[Any] | None, available: tuple[Any, ...], source: str) -> tuple[Any, ...]:
    """The chosen subset of an axis, in the preset's order; ValueError for values not in it."""
    if chosen is None:
        return available
    missing = [c for c in chosen if c not in available]
    if missing:
        raise ValueError(f"{name} {missing} not in preset {source}; it has {list(available)}")
    return tuple(a for a in available if a in chosen)


def resolve_config(preset: Preset, task: str, setting: Setting, rule: str, seed: int) -> RunConfig:
    """The config of one grid cell: base, then the task's overrides, then the setting's, then
    the rule and seed, made canonical (:func:`canonical`), so settings that differ only where a
    run does not look share one run."""
    d: dict[str, Any] = {**preset.base, **preset.tasks[task], **setting.overrides}
    d["rule_options"] = {
        **preset.base.get("rule_options", {}),
        **preset.rule_options.get(rule, {}),
        **setting.overrides.get("rule_options", {}),
    }
    d.update(task=task, rule=rule, seed=seed)
    return canonical(RunConfig.from_dict(d))


def canonical(cfg: RunConfig) -> RunConfig:
    """``cfg`` with what its run does not read normalised. The centralized reference pools
    every client's data (the partition covers every example) into one client of the largest
    rank, so its partition and other ranks do not change what it computes: they become IID and
    the largest rank; at one client's budget (``centralized-steps``) the sampled fraction does
    not either. A run's identity is that of its canonical config, whether it came from a
    preset or from ``glora run`` (``--reuse-from``)."""
    rule = RULES.get(cfg.rule)
    if rule is not None and rule.pooled:
        cfg = cfg.replace(alpha=None, ranks=str(max(cfg.client_ranks())))
        if rule.pooled_budget == "client":
            cfg = cfg.replace(fraction=1.0)  # one pooled client, one client's steps: nothing to sample
    return cfg


def expand(
    preset: Preset,
    seeds: list[int] | None = None,
    rules: list[str] | None = None,
    tasks: list[str] | None = None,
    settings: list[str] | None = None,
) -> list[PlannedRun]:
    """The grid's distinct runs, seeds outermost (then tasks, settings, rules), so a sweep
    stopped part-way has whole tables for its first seeds. Every config is checked here,
    before anything runs. Optional filters pick a subset of each axis."""
    src = preset.source
    seeds_ = _pick("seeds", seeds, preset.seeds, src)
    rules_ = _pick("rules", rules, preset.all_rules(), src)
    tasks_ = _pick("tasks", tasks, tuple(preset.tasks), src)
    settings_ = _pick("settings", settings, tuple(preset.settings), src)
    runs: dict[str, PlannedRun] = {}
    for seed in seeds_:
        for task in tasks_:
            for name in settings_:
                setting = preset.settings[name]
                for rule in setting.rules or preset.rules:
                    if rule not in rules_:
                        continue
                    label = Label(task, name, rule, seed)
                    try:
                        cfg = resolve_config(preset, task, setting, rule, seed)
                        check_config(cfg)
                    except (ValueError, TypeError) as e:
                        raise ValueError(f"preset {src}: run {label.to_dict()}: {e}") from None
                    ident = cfg.identity()
                    if ident in runs:
                        runs[ident].labels.append(label)
                    else:
                        runs[ident] = PlannedRun(cfg, [label], estimate_seconds(cfg, preset.cost))
    return list(runs.values())
