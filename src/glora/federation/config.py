"""A run's configuration: one dataclass whose fields declare their help, group and spelling
(:func:`option`), read from TOML or plain values, checked before any training starts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glora.federation.config_values import (
    effective_rule_options,
    identity_rule_options,
    legacy_options,
    none_words,
    task_defaults,
    typed_fields,
)
from glora.federation.ranks import RANK_DISTRIBUTIONS, parse_ranks

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
    "clip_update_norm": None,
    "partition_scheme": "resample",
    "eval_clients": None,
}


# The groups a run's options are shown in (``glora run --help`` panels, the TOML template).
DATA, FEDERATION, MODEL, TRAINING, EVALUATION, SUPERNI, OUTPUT = (
    "Data",
    "Federation",
    "Model",
    "Training",
    "Evaluation",
    "SuperNI",
    "Output",
)


def option(
    default: Any,
    help: str,
    group: str,
    *,
    none: str | None = None,
    default_text: str | None = None,
    envvar: str | None = None,
    identity: bool = True,
) -> Any:
    """A RunConfig field with what every front end needs to show and read it.

    ``default`` is the value, or a factory (a type such as ``dict``) for a mutable one;
    ``none``: the word that spells None where it is not the default (``alpha = "iid"``), the
    same in the CLI, TOML and the Flower config; ``default_text``: the default as help shows
    it where the value alone does not say it; ``envvar``: an environment variable the CLI
    reads; ``identity=False``: the field says where or how a run is computed or what it
    keeps, never what it computes, so it is not part of the run's identity.
    """
    metadata = {
        "help": help,
        "group": group,
        "none": none,
        "default_text": default_text,
        "envvar": envvar,
        "identity": identity,
    }
    if isinstance(default, type):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything that defines a run. Its identity is the hash of these values.

    Each field is declared once, with its help text and group (:func:`option`): the
    ``glora run`` options (glora.run_command), the ``--config`` TOML (:func:`toml_template`)
    and the Flower run config (glora.flower.config) are generated from these declarations.
    """

    # -- data ---------------------------------------------------------------------------------
    task: str = option(
        "sst2",
        "GLUE task (sst2, cola, mrpc, rte, stsb, qnli [eval only], mnli, qqp), superni, or classification / "
        "instructions for your own --dataset (set from the columns given when left out).",
        DATA,
    )
    dataset: str = option(
        "",
        "Your own data: a .csv/.tsv/.json/.jsonl/.parquet file (gzip allowed), a folder with train.* and "
        "validation.* (or test.*), or a hub id, read with the `datasets` library.",
        DATA,
    )
    dataset_config: str = option("", "A hub dataset's configuration name.", DATA)
    dataset_revision: str = option("", "A hub dataset's revision.", DATA)
    validation_fraction: float = option(0.1, "Share of a single file held out (seeded) as the validation split.", DATA)
    text_column: str = option("", "Classification: the text column.", DATA)
    text_pair_column: str = option("", "Classification: the second text of a pair.", DATA)
    label_column: str = option(
        "",
        "Classification: the label column (strings or integers; fractional numbers: regression). "
        "Instructions: a category column for Dirichlet skew.",
        DATA,
    )
    regression: bool | None = option(
        None, "Treat the label column as a regression target (or not).", DATA, default_text="inferred"
    )
    prompt_column: str = option("", "Instructions: the instruction column.", DATA)
    input_column: str = option("", "Instructions: an optional input column.", DATA)
    response_column: str = option("", "Instructions: the response column (trained on, scored by ROUGE-L).", DATA)
    data_dir: str | None = option(
        None, "Data directory.", DATA, default_text="../shared/data", envvar="GLORA_DATA_DIR", identity=False
    )
    data_source: str = option(
        "local", "Where GLUE is read: local (--data-dir) or hub (the Hugging Face hub, online).", DATA
    )
    max_train_examples: int | None = option(
        None, "Cap on the pooled training set (seeded sample).", DATA, default_text="all"
    )
    max_length: int = option(64, "Max tokens per example (dynamic padding).", DATA)

    # -- federation ---------------------------------------------------------------------------
    rule: str = option(
        "glora", "Aggregation rule (see README), or a reference: centralized, centralized-steps, local.", FEDERATION
    )
    rule_options: dict[str, Any] = option(  # noqa: RUF009 (a Field with default_factory=dict)
        dict, "Rule option key=value, repeatable (e.g. rank=16, readout_gauge=a-normal).", FEDERATION
    )
    clients: int = option(10, "Number of clients.", FEDERATION)
    alpha: float | None = option(
        0.5, "Dirichlet label-skew concentration (> 0; smaller is more skewed), or iid.", FEDERATION, none="iid"
    )
    partition_column: str = option(
        "",
        "A natural partition: every distinct value's rows go to one client (a user id, a hospital, a task).",
        FEDERATION,
    )
    min_client_examples: int = option(20, "Fewest examples a client holds under Dirichlet skew.", FEDERATION)
    partition_scheme: str = option(
        "resample",
        "How a Dirichlet split is drawn: resample (Hsu et al.: redraw until every client holds "
        "min-client-examples; a few dozen clients at most) or one-pass (each client's label mix from "
        "Dir(alpha), sizes balanced, never redrawn: any number of clients).",
        FEDERATION,
    )
    ranks: str = option(
        "2,4,8,16",
        f"Client LoRA ranks: one rank, a list assigned in turn, or {' / '.join(RANK_DISTRIBUTIONS)}.",
        FEDERATION,
    )
    rounds: int = option(12, "Server rounds; 0 evaluates the untuned backbone (zero-shot).", FEDERATION)
    fraction: float = option(1.0, "Fraction of clients sampled per round.", FEDERATION)
    weighting: str = option("examples", "Client weights: examples or uniform.", FEDERATION)
    random_gauge: bool = option(False, "Control: clients re-gauge their factors randomly before upload.", FEDERATION)
    # A failing client (training raised, an update that is not finite, in Flower also no or a
    # bad reply): left out of its round, as Flower's strategies do, unless told to stop.
    on_client_error: str = option(
        "skip",
        "A client whose training raises or whose update is not finite: skip (left out of the round, "
        "recorded under left_out in metrics.jsonl) or abort (the run stops).",
        FEDERATION,
        identity=False,
    )
    max_failed_fraction: float = option(
        0.5,
        "The run stops (its last checkpoint kept) when more than this share of a round's clients is left out.",
        FEDERATION,
        identity=False,
    )
    clip_update_norm: float | None = option(
        None,
        "Clip each client's update (the Frobenius norm of its dense update, from the factors) to this "
        "multiple of the round's median client norm, before the rule aggregates.",
        FEDERATION,
        default_text="none: no clipping",
    )
    seed: int = option(0, "Seed of everything (partition, init, sampling, batches).", FEDERATION)

    # -- model --------------------------------------------------------------------------------
    backbone: str = option(
        "minilm", "minilm, mpnet (GLUE), smollm2 (superni), a Hugging Face model folder or a hub id.", MODEL
    )
    # "mean": the mask-averaged token states that sentence-transformers encoders are trained
    # for (glora.models.mean_pooled); "cls": the model's own sequence-classification head.
    pooling: str = option(
        "mean",
        "What the classification head reads: cls (the backbone's own head) or mean (of the token states).",
        MODEL,
    )
    lora_alpha_per_rank: float = option(2.0, "LoRA alpha over the rank (alpha = this x r).", MODEL)
    rslora: bool = option(False, "rsLoRA scale lora_alpha / sqrt(r).", MODEL)
    target_modules: tuple[str, ...] = option(
        ("query", "value"), "Comma-separated module names to adapt, or all-linear.", MODEL
    )
    # Real-size clients (glora.models.precision): the LoRA factors and the head stay float32.
    dtype: str = option("float32", "The frozen base's dtype: float32, bfloat16, float16.", MODEL)
    load_in_4bit: bool = option(False, "NF4 base (bitsandbytes, CUDA), as QLoRA.", MODEL)
    load_in_8bit: bool = option(False, "8-bit base (bitsandbytes, CUDA).", MODEL)
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass (memory for time).", MODEL, identity=False
    )
    device: str = option(
        "auto", "Where the model runs: auto (CUDA when available), cpu, cuda, cuda:N.", MODEL, identity=False
    )
    threads: int = option(2, "torch CPU threads.", MODEL, identity=False)

    # -- training -----------------------------------------------------------------------------
    local_steps: int = option(10, "Local optimizer steps per round.", TRAINING)
    local_epochs: float | None = option(None, "Local epochs per round (replaces --local-steps).", TRAINING)
    batch_size: int = option(32, "Local batch size.", TRAINING)
    grad_accum_steps: int = option(
        1, "Micro-batches per optimizer step (effective batch = batch size x this).", TRAINING
    )
    lr: float = option(5e-4, "AdamW learning rate of the LoRA factors.", TRAINING)
    head_lr: float | None = option(
        None, "Learning rate of the classification head.", TRAINING, default_text="lr x head-lr-ratio"
    )
    # The new head learns from scratch what the frozen features already carry (a linear probe
    # of MiniLM's mean-pooled features scores 78.8% on SST-2), while the factors drift apart
    # under label skew at high rates: the head learns faster than the factors by this ratio
    # (results/sst2-default-probes: head lr 2e-3 and 5e-3 against 5e-4 for the factors).
    head_lr_ratio: float = option(
        10.0, "The head's learning rate over the factors', when head-lr is not given.", TRAINING
    )
    # tau of the logit-adjusted loss (Menon et al., 2021) with each client's own label prior,
    # a remedy for label skew (FedLC/FedRS family).
    logit_adjustment: float = option(
        0.0,
        "tau of the logit-adjusted loss: clients add tau x log(their label prior) to the logits in the loss, "
        "against label skew; 0 = cross-entropy. Classification only.",
        TRAINING,
    )
    weight_decay: float = option(0.0, "AdamW weight decay of the LoRA factors.", TRAINING)
    max_grad_norm: float | None = option(None, "Clip each step's gradient norm.", TRAINING, default_text="none")

    # -- evaluation ---------------------------------------------------------------------------
    metric: str = option(
        "",
        "The main metric: accuracy, f1_macro, matthews_correlation (2 classes), pearson, spearmanr (regression), "
        "rougeL, exact_match (instructions).",
        EVALUATION,
        default_text="the first of these the task reports",
    )
    eval_every: int = option(5, "Evaluate every E rounds (and at the end).", EVALUATION)
    eval_batch_size: int = option(128, "Evaluation batch size (superni: generation).", EVALUATION)
    eval_ranks: bool = option(True, "Also evaluate the model each client rank receives (unequal ranks).", EVALUATION)
    max_eval_examples: int | None = option(None, "Cap on the evaluation split.", EVALUATION, default_text="all")
    # "heldout": a seeded slice of the training data kept out of every client, for tuning
    # without touching validation.
    eval_split: str = option(
        "validation", "validation, or heldout: a fixed slice of the training data, for tuning.", EVALUATION
    )
    heldout_examples: int = option(1000, "Size of the held-out slice (eval-split heldout).", EVALUATION)
    personal_holdout: float = option(
        0.0,
        "Share of each client's own data held out and never trained on; at the end each client's own model "
        "(personalised rules) and the global model are scored on it too; 0: none.",
        EVALUATION,
    )
    eval_clients: int | None = option(
        None,
        "Personalised rules: score a seeded sample of N clients' own models at every evaluation (which ones: "
        "eval_personal_clients in metrics.jsonl); the last round scores every client's.",
        EVALUATION,
        default_text="none: every client's own model, at the last round only",
    )

    # -- SuperNI (glora.tasks.superni.SUPERNI_DEFAULTS sets the shared fields above) ------------
    superni_tasks_per_client: int = option(1, "Distinct training tasks per client (1: FlexLoRA's protocol).", SUPERNI)
    superni_by_category: bool = option(False, "Each client holds every training task of one category.", SUPERNI)
    superni_train_tasks: str = option(
        "", "Comma-separated training tasks the clients' tasks are drawn from.", SUPERNI, default_text="all 687"
    )
    superni_test_tasks: str = option(
        "", "Comma-separated unseen tasks to draw from.", SUPERNI, default_text="the 103 official test tasks"
    )
    superni_eval_tasks: int | None = option(
        20, "Unseen tasks scored (spread over categories), or all.", SUPERNI, none="all"
    )
    superni_eval_instances: int = option(20, "Instances per unseen task.", SUPERNI)
    superni_seen_instances: int = option(
        5, "Held-out instances per client task, for the seen score (0: none).", SUPERNI
    )
    superni_num_examples: int = option(2, "Positive examples in each prompt (0 allowed).", SUPERNI)
    superni_max_target_length: int = option(
        32, "Target tokens trained on (the prompt gets max-length minus this).", SUPERNI
    )
    superni_max_new_tokens: int = option(32, "Cap on generated tokens at evaluation.", SUPERNI)

    # -- output -------------------------------------------------------------------------------
    record_updates: bool = option(
        False, "Store every round's client updates under OUT/updates/ for `glora replay`.", OUTPUT, identity=False
    )
    report_to: str = option(
        "",
        "Also log each round to these trackers: tensorboard, mlflow, wandb (comma-separated; metrics.jsonl "
        "stays the record).",
        OUTPUT,
        identity=False,
    )

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
        d = {**task_defaults(d.get("task", cls.task), d, cls.rounds), **d}
        d = typed_fields(cls, none_words(cls, d))
        for key in ("superni_train_tasks", "superni_test_tasks"):
            if isinstance(d.get(key), list):
                d[key] = ",".join(d[key])
        if isinstance(d.get("target_modules"), str):
            d["target_modules"] = [m.strip() for m in d["target_modules"].split(",") if m.strip()]
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
        d["rule_options"] = {**legacy_options(rule), **d.get("rule_options", {})}
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


# Fields that say where and how a run is computed or what it keeps, never what it computes.
NOT_IDENTITY = tuple(f.name for f in dataclasses.fields(RunConfig) if not f.metadata["identity"])
