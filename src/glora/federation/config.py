"""A run's configuration: one dataclass with defaults that learn, read from TOML, checked
before any training starts."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Named client-rank distributions: "skewed" is few high-rank clients, many low-rank ones.
RANK_DISTRIBUTIONS: dict[str, tuple[tuple[int, float], ...]] = {
    "uniform-2-16": ((2, 0.25), (4, 0.25), (8, 0.25), (16, 0.25)),
    "skewed": ((2, 0.4), (4, 0.3), (8, 0.2), (16, 0.1)),
}


# Fields added after runs were recorded, with the value that means "as before": left out of
# the identity at that value, so finished runs keep their names and sweeps still skip them.
_ADDED_FIELDS: dict[str, Any] = {
    "logit_adjustment": 0.0,
    "pooling": "cls",
    "head_lr_ratio": 1.0,
    "dataset": "",
    "dataset_config": "",
    "dataset_revision": "",
    "text_column": "",
    "text_pair_column": "",
    "label_column": "",
    "regression": None,
    "validation_fraction": 0.1,
    "partition_column": "",
    "metric": "",
    "prompt_column": "",
    "input_column": "",
    "response_column": "",
    "personal_holdout": 0.0,
    "dtype": "float32",
    "load_in_4bit": False,
    "load_in_8bit": False,
    "grad_accum_steps": 1,
    "max_grad_norm": None,
}


# Fields that say where and how a run is computed or what it keeps, never what it computes.
NOT_IDENTITY = ("threads", "device", "data_dir", "record_updates", "report_to", "gradient_checkpointing")


@dataclass
class RunConfig:
    """Everything that defines a run. Its identity is the hash of these values."""

    task: str = "sst2"
    rule: str = "glora"
    rule_options: dict[str, Any] = field(default_factory=dict)
    backbone: str = "minilm"
    # What the classification head reads: "cls", the model's own sequence-classification head
    # (first token, through the backbone's pooler), or "mean", the mask-averaged token states
    # that sentence-transformers encoders are trained for (glora.models.mean_pooled).
    pooling: str = "mean"
    clients: int = 10
    alpha: float | None = 0.5  # Dirichlet concentration; None = IID
    min_client_examples: int = 20
    ranks: str = "2,4,8,16"  # one rank, a list assigned in turn, or a name in RANK_DISTRIBUTIONS
    lora_alpha_per_rank: float = 2.0
    rslora: bool = False
    target_modules: tuple[str, ...] = ("query", "value")
    rounds: int = 12
    fraction: float = 1.0  # clients sampled per round
    local_steps: int = 10
    local_epochs: float | None = None  # if set, replaces local_steps by epochs over the client's data
    batch_size: int = 32
    lr: float = 5e-4
    head_lr: float | None = None  # default: lr x head_lr_ratio
    # The new head learns from scratch what the frozen features already carry (a linear probe
    # of MiniLM's mean-pooled features scores 78.8% on SST-2), while the factors drift apart
    # under label skew at high rates: the head learns faster than the factors by this ratio
    # (results/sst2-default-probes: head lr 2e-3 and 5e-3 against 5e-4 for the factors).
    head_lr_ratio: float = 10.0
    # tau of the logit-adjusted loss (Menon et al., 2021) with each client's own label prior,
    # a remedy for label skew (FedLC/FedRS family); 0: plain cross-entropy. Classification only.
    logit_adjustment: float = 0.0
    weight_decay: float = 0.0
    max_length: int = 64
    eval_every: int = 5
    eval_batch_size: int = 128
    eval_ranks: bool = True  # also evaluate the model each client rank receives
    max_train_examples: int | None = None  # cap on the pooled training set (None: all)
    max_eval_examples: int | None = None
    # "validation" (the GLUE evaluation split) or "heldout": a seeded slice of the training
    # data (heldout_examples) kept out of every client, for tuning without touching validation.
    eval_split: str = "validation"
    heldout_examples: int = 1000
    weighting: str = "examples"  # or "uniform"
    # Share of each client's own examples held out (seeded) and never trained on: at the end,
    # each client's own model (personalised rules) and the global model are also scored on it,
    # the personalisation claim's test. 0: no share held out.
    personal_holdout: float = 0.0
    random_gauge: bool = False  # control: clients re-gauge their factors before upload
    seed: int = 0
    threads: int = 2
    device: str = "auto"  # "auto": CUDA when available, else the CPU; or any torch device name
    # Real-size clients (glora.models.precision): the frozen base's dtype or quantization (the
    # LoRA factors and the head stay float32), activation checkpointing, and micro-batches per
    # optimizer step (the effective batch is batch_size x grad_accum_steps; local_steps counts
    # optimizer steps). max_grad_norm: clip each step's gradient norm (None: no clipping).
    dtype: str = "float32"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    gradient_checkpointing: bool = False
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    data_dir: str | None = None
    data_source: str = "local"  # or "hub"
    # Store every round's client updates (factors, weights, heads) under updates/ in the run
    # folder, for `glora replay`: other rules aggregated on identical inputs. Not part of a
    # run's identity (it changes what is kept, not what is computed).
    record_updates: bool = False
    # Trackers that also get each round's metrics (glora.tracking): "tensorboard", "mlflow",
    # "wandb", comma-separated; "" none. Not part of a run's identity.
    report_to: str = ""
    # Your own data (task "classification" or "instructions"): a file, a folder of split
    # files, or a hub id, read with the `datasets` library (glora.tasks.dataset_files).
    dataset: str = ""
    dataset_config: str = ""  # a hub dataset's configuration name
    dataset_revision: str = ""  # a hub dataset's revision
    validation_fraction: float = 0.1  # of a single file, held out (seeded) as the validation split
    text_column: str = ""  # classification: the text (and, for pairs, text_pair_column)
    text_pair_column: str = ""
    label_column: str = ""  # classification: the label; instructions: a category for Dirichlet skew
    regression: bool | None = None  # a float label column is a regression target (None: inferred)
    partition_column: str = ""  # a natural partition: each distinct value's rows go to one client
    metric: str = ""  # the main metric ("": accuracy, pearson for regression, rougeL for instructions)
    prompt_column: str = ""  # instructions: the instruction, an optional input, the response
    input_column: str = ""
    response_column: str = ""
    # SuperNI (task "superni"; glora.tasks.superni.SUPERNI_DEFAULTS gives its values above).
    superni_tasks_per_client: int = 1  # distinct training tasks per client (1: FlexLoRA's protocol)
    superni_by_category: bool = False  # each client holds every training task of one category
    superni_train_tasks: str = ""  # comma-separated pool the clients' tasks are drawn from ("": all 687)
    superni_test_tasks: str = ""  # comma-separated pool of unseen tasks ("": the 103 official test tasks)
    superni_eval_tasks: int | None = 20  # unseen tasks evaluated, spread over categories (None: all)
    superni_eval_instances: int = 20  # instances per unseen task
    superni_seen_instances: int = 5  # held-out instances per client task, for the seen score (0: none)
    superni_num_examples: int = 2  # positive examples in each prompt
    superni_max_target_length: int = 32  # target tokens trained on; the prompt gets max_length minus this
    superni_max_new_tokens: int = 32  # cap on generated tokens at evaluation

    # -- derived ------------------------------------------------------------------------------
    def client_ranks(self) -> list[int]:
        """The rank of each client (index = client id)."""
        return parse_ranks(self.ranks, self.clients, self.seed)

    def effective_head_lr(self) -> float:
        """The classification head's learning rate: head_lr if given, else lr x head_lr_ratio."""
        return self.head_lr if self.head_lr is not None else self.lr * self.head_lr_ratio

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as config.json stores them. A rule option whose default changed is
        written out (its current default where not given), so a saved run says what it ran."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["rule_options"] = effective_rule_options(self.rule, self.rule_options)
        return d

    def identity(self) -> str:
        """A short hash of the resolved config: a run's name in a sweep. Fields added after
        results were recorded are left out at their inert value, so old identities still hold."""
        payload = {
            k: v
            for k, v in self.to_dict().items()
            if k not in NOT_IDENTITY and not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])
        }
        payload["rule_options"] = identity_rule_options(self.rule, self.rule_options)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """A config from plain values; fields left out take the task's defaults
        (:func:`task_defaults`), then the dataclass defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(names)}")
        d = {**task_defaults(d.get("task", cls.task), d), **d}
        if d.get("alpha") in ("iid", ""):
            d["alpha"] = None  # IID, as presets and the Flower config spell it
        d = typed_fields(cls, d)
        for key in ("superni_train_tasks", "superni_test_tasks"):
            if isinstance(d.get(key), list):
                d[key] = ",".join(d[key])
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        if "ranks" in d and not isinstance(d["ranks"], str):
            d["ranks"] = ",".join(str(r) for r in (d["ranks"] if isinstance(d["ranks"], list) else [d["ranks"]]))
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> RunConfig:
        """The config a run folder's config.json records. A field added after the run was
        saved is absent there and meant its inert value then, not today's default."""
        d = {k: v for k, v in d.items() if k != "identity"}
        rule = d.get("rule", cls.rule)
        # A rule option whose default changed after the run was saved meant its old value then.
        d["rule_options"] = {**_legacy_options(rule), **d.get("rule_options", {})}
        return cls.from_dict({**{k: v for k, v in _ADDED_FIELDS.items() if k not in d}, **d})

    @staticmethod
    def read_toml(path: Path) -> dict[str, Any]:
        """The values of a run's TOML file, unresolved (see :meth:`from_dict`)."""
        with Path(path).open("rb") as f:
            return tomllib.load(f)

    @classmethod
    def from_toml(cls, path: Path) -> RunConfig:
        return cls.from_dict(cls.read_toml(path))

    @classmethod
    def for_task(cls, task: str, **values: Any) -> RunConfig:
        """The config of ``task`` with its defaults, and ``values`` on top."""
        return cls.from_dict({"task": task, **values})

    def replace(self, **changes: Any) -> RunConfig:
        """Changed fields, nothing else: changing the task does not apply its defaults (use for_task)."""
        return dataclasses.replace(self, **changes)


def _legacy_options(rule: str) -> dict[str, Any]:
    """The options whose default changed after runs of ``rule`` were recorded, at the value that
    leaving them out meant then (:attr:`Rule.legacy_options`)."""
    from glora.aggregation import RULES

    return dict(getattr(RULES.get(rule), "legacy_options", {}))


def identity_rule_options(rule: str, options: dict[str, Any]) -> dict[str, Any]:
    """The rule options a run's identity hashes: the options as the rule will read them (a
    changed default made explicit, so a run under the new default has a new identity), less
    those at their legacy value (so every run recorded before the change keeps its identity)."""
    legacy = _legacy_options(rule)
    effective = effective_rule_options(rule, options)
    return {k: v for k, v in effective.items() if not (k in legacy and v == legacy[k])}


def effective_rule_options(rule: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every option whose default changed (:attr:`Rule.legacy_options`) at the
    value the rule will use: given, or the rule's current default."""
    from glora.aggregation import RULES

    legacy = _legacy_options(rule)
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


def task_defaults(task: str, given: dict[str, Any]) -> dict[str, Any]:
    """The defaults of ``task``'s family (:attr:`glora.tasks.base.TaskFamily.defaults`) for
    fields not in ``given``; ``eval_every = "rounds"`` there means at the end only."""
    from glora.tasks import task_class

    out = dict(task_class(task).defaults)
    if out.get("eval_every") == "rounds":
        out["eval_every"] = max(1, int(given.get("rounds", out.get("rounds", RunConfig.rounds))))
    return out


def parse_ranks(spec: str, clients: int, seed: int = 0) -> list[int]:
    """'8' -> every client rank 8; '2,4,8,16' -> assigned in turn; a distribution name ->
    sampled with the seed. ValueError for zeros, negatives or unknown names."""
    spec = str(spec).strip()
    if spec in RANK_DISTRIBUTIONS:
        import numpy as np

        values, probs = zip(*RANK_DISTRIBUTIONS[spec], strict=True)
        rng = np.random.default_rng(seed + 7919)
        # Deterministic counts in proportion, then a seeded shuffle: every rank appears.
        counts = [max(1, round(p * clients)) for p in probs]
        while sum(counts) > clients:
            counts[counts.index(max(counts))] -= 1
        while sum(counts) < clients:
            counts[0] += 1
        ranks = [v for v, c in zip(values, counts, strict=True) for _ in range(c)]
        return [int(r) for r in rng.permutation(ranks)]
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--ranks {spec!r}: give one rank (8), a list assigned in turn (2,4,8,16), "
            f"or a distribution name ({', '.join(RANK_DISTRIBUTIONS)})"
        ) from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--ranks {spec!r}: every rank must be a positive integer")
    return [values[i % len(values)] for i in range(clients)]
