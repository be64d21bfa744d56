"""The ``glora`` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from glora.federation.config import RANK_DISTRIBUTIONS, RunConfig
from glora.tasks.superni import SUPERNI_DEFAULTS

_D = RunConfig()
_S = SUPERNI_DEFAULTS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",  # "rich" would read "[default: ...]" in help texts as markup and drop it
    help="Federated LoRA fine-tuning with GLoRA.",
)


def _version(show: bool) -> None:
    if show:
        import glora
        from glora.federation.results import git_commit

        commit = git_commit()
        typer.echo(f"glora {glora.__version__}" + (f" (git {commit})" if commit != "unknown" else ""))
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="The package version (and git commit of a checkout)."
    ),
) -> None:
    """glora: aggregate what the clients' adapters mean, not the factors that represent them."""


@app.command()
def demo(seed: int = typer.Option(0, help="Seed of the synthetic client updates.")) -> None:
    """Aggregate real-shaped LoRA updates with GLoRA, FedIT and a dense SVD, and compare."""
    from glora.experiments.demo import print_demo, run_demo

    print_demo(run_demo(seed))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _rule_options(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--rule-option {item!r}: write key=value, e.g. --rule-option rank=16")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


@app.command()
def run(
    config: Path | None = typer.Option(
        None, "--config", help="TOML file of run options; command-line options override it."
    ),
    task: str | None = typer.Option(
        None,
        help=f"GLUE task (sst2, cola, mrpc, rte, stsb, qnli [eval only], mnli, qqp) or superni. [default: {_D.task}]",
    ),
    rule: str | None = typer.Option(
        None, help=f"Aggregation rule (see README), or the references centralized / local. [default: {_D.rule}]"
    ),
    rule_option: list[str] = typer.Option(
        [], "--rule-option", help="Rule option key=value, repeatable (e.g. rank=16, readout_gauge=a-normal)."
    ),
    backbone: str | None = typer.Option(
        None,
        help=f"minilm, mpnet (GLUE), smollm2 (superni), a Hugging Face model folder or a hub id. "
        f"[default: {_D.backbone}; superni: {_S['backbone']}]",
    ),
    clients: int | None = typer.Option(None, help=f"Number of clients. [default: {_D.clients}]"),
    alpha: float | None = typer.Option(
        None,
        help=f"Dirichlet label-skew concentration (> 0; smaller is more skewed). [default: {_D.alpha}; superni: none, "
        "clients split by task]",
    ),
    iid: bool = typer.Option(False, "--iid", help="IID partition instead of Dirichlet label skew."),
    ranks: str | None = typer.Option(
        None,
        help=f"Client LoRA ranks: one rank, a list assigned in turn, or {'/'.join(RANK_DISTRIBUTIONS)}. "
        f"[default: {_D.ranks}]",
    ),
    rounds: int | None = typer.Option(
        None,
        help=f"Server rounds; 0 evaluates the untuned backbone (zero-shot). [default: {_D.rounds}; superni: "
        f"{_S['rounds']}]",
    ),
    fraction: float | None = typer.Option(
        None, help=f"Fraction of clients sampled per round. [default: {_D.fraction}]"
    ),
    local_steps: int | None = typer.Option(
        None, help=f"Local optimiser steps per round. [default: {_D.local_steps}; superni: {_S['local_steps']}]"
    ),
    local_epochs: float | None = typer.Option(None, help="Local epochs per round (replaces --local-steps)."),
    batch_size: int | None = typer.Option(
        None, help=f"Local batch size. [default: {_D.batch_size}; superni: {_S['batch_size']}]"
    ),
    lr: float | None = typer.Option(
        None, help=f"AdamW learning rate of the LoRA factors. [default: {_D.lr}; superni: {_S['lr']}]"
    ),
    head_lr: float | None = typer.Option(
        None, help="Learning rate of the classification head. [default: --lr x --head-lr-ratio]"
    ),
    head_lr_ratio: float | None = typer.Option(
        None,
        help=f"The head's learning rate over the factors', when --head-lr is not given. [default: {_D.head_lr_ratio}; "
        f"superni: {_S['head_lr_ratio']} (no head)]",
    ),
    pooling: str | None = typer.Option(
        None,
        help="What the classification head reads: cls (the backbone's own head) or mean (the mean of the "
        f"token states, as sentence-transformers encoders are trained). [default: {_D.pooling}]",
    ),
    logit_adjustment: float | None = typer.Option(
        None,
        help="tau of the logit-adjusted loss: clients add tau x log(their label prior) to the logits in the "
        f"loss, against label skew; 0 = cross-entropy. Classification only. [default: {_D.logit_adjustment}]",
    ),
    max_length: int | None = typer.Option(
        None, help=f"Max tokens per example (dynamic padding). [default: {_D.max_length}; superni: {_S['max_length']}]"
    ),
    eval_every: int | None = typer.Option(
        None, help=f"Evaluate every E rounds (and at the end). [default: {_D.eval_every}; superni: --rounds]"
    ),
    eval_batch_size: int | None = typer.Option(
        None,
        help=f"Evaluation batch size (superni: generation). [default: {_D.eval_batch_size}; superni: "
        f"{_S['eval_batch_size']}]",
    ),
    eval_ranks: bool | None = typer.Option(
        None,
        "--eval-ranks/--no-eval-ranks",
        help="Also evaluate the model each client rank receives (unequal ranks). "
        f"[default: {_D.eval_ranks}; superni: {_S['eval_ranks']}]",
    ),
    max_train_examples: int | None = typer.Option(
        None, help="Cap on the pooled training set (seeded sample). [default: all]"
    ),
    max_eval_examples: int | None = typer.Option(None, help="Cap on the evaluation split. [default: all]"),
    eval_split: str | None = typer.Option(
        None, help=f"validation, or heldout: a fixed slice of the training data, for tuning. [default: {_D.eval_split}]"
    ),
    weighting: str | None = typer.Option(None, help=f"Client weights: examples or uniform. [default: {_D.weighting}]"),
    random_gauge: bool = typer.Option(
        False, "--random-gauge", help="Control: clients re-gauge their factors randomly before upload."
    ),
    rslora: bool = typer.Option(False, "--rslora", help="rsLoRA scale lora_alpha / sqrt(r)."),
    dtype: str | None = typer.Option(
        None,
        help="The frozen base's dtype: float32, bfloat16, float16 (LoRA factors and the head stay float32). "
        "[default: float32]",
        rich_help_panel="Real-size clients",
    ),
    load_in_4bit: bool = typer.Option(
        False, "--load-in-4bit", help="NF4 base (bitsandbytes, CUDA), as QLoRA.", rich_help_panel="Real-size clients"
    ),
    load_in_8bit: bool = typer.Option(
        False, "--load-in-8bit", help="8-bit base (bitsandbytes, CUDA).", rich_help_panel="Real-size clients"
    ),
    gradient_checkpointing: bool = typer.Option(
        False,
        "--gradient-checkpointing",
        help="Recompute activations in the backward pass (memory for time; not part of a run's identity).",
        rich_help_panel="Real-size clients",
    ),
    grad_accum_steps: int | None = typer.Option(
        None,
        help="Micro-batches per optimizer step (effective batch = --batch-size x this; --local-steps counts "
        "optimizer steps). [default: 1]",
        rich_help_panel="Real-size clients",
    ),
    max_grad_norm: float | None = typer.Option(
        None, help="Clip each step's gradient norm. [default: none]", rich_help_panel="Real-size clients"
    ),
    report_to: str | None = typer.Option(
        None,
        help="Also log each round to these trackers: none, tensorboard, mlflow, wandb (comma-separated; "
        "metrics.jsonl stays the record; not part of the run's identity). [default: none]",
    ),
    record_updates: bool = typer.Option(
        False,
        "--record-updates",
        help="Store every round's client updates under OUT/updates/ for `glora replay` (not part of the "
        "run's identity).",
    ),
    target_modules: str | None = typer.Option(
        None,
        help=f"Comma-separated module names to adapt, or all-linear. [default: {','.join(_D.target_modules)}; "
        f"superni: {','.join(_S['target_modules'])}]",
    ),
    seed: int | None = typer.Option(
        None, help=f"Seed of everything (partition, init, sampling, batches). [default: {_D.seed}]"
    ),
    threads: int | None = typer.Option(None, help=f"torch CPU threads. [default: {_D.threads}]"),
    device: str | None = typer.Option(
        None, help=f"Where the model runs: auto (CUDA when available), cpu, cuda, cuda:N. [default: {_D.device}]"
    ),
    data_dir: str | None = typer.Option(
        None, envvar="GLORA_DATA_DIR", help="Data directory. [default: ../shared/data]"
    ),
    hub: bool = typer.Option(
        False, "--hub", help="Load the data from the Hugging Face hub (online) instead of --data-dir."
    ),
    dataset: str | None = typer.Option(
        None,
        help="Your own data: a .csv/.tsv/.json/.jsonl/.parquet file (gzip allowed), a folder with train.* and "
        "validation.* (or test.*), or a hub id. Sets --task to classification, or instructions when "
        "--response-column is given.",
        rich_help_panel="Your own data",
    ),
    dataset_config: str | None = typer.Option(
        None, help="A hub dataset's configuration name.", rich_help_panel="Your own data"
    ),
    dataset_revision: str | None = typer.Option(
        None, help="A hub dataset's revision.", rich_help_panel="Your own data"
    ),
    validation_fraction: float | None = typer.Option(
        None,
        help=f"Share of a single file held out (seeded) as the validation split. [default: {_D.validation_fraction}]",
        rich_help_panel="Your own data",
    ),
    text_column: str | None = typer.Option(
        None, help="Classification: the text column.", rich_help_panel="Your own data"
    ),
    text_pair_column: str | None = typer.Option(
        None, help="Classification: the second text of a pair.", rich_help_panel="Your own data"
    ),
    label_column: str | None = typer.Option(
        None,
        help="Classification: the label column (strings or integers; fractional numbers: regression). "
        "Instructions: a category column for --alpha skew.",
        rich_help_panel="Your own data",
    ),
    regression: bool | None = typer.Option(
        None,
        "--regression/--no-regression",
        help="Treat the label column as a regression target (or not). [default: inferred]",
        rich_help_panel="Your own data",
    ),
    partition_column: str | None = typer.Option(
        None,
        help="A natural partition: every distinct value's rows go to one client (a user id, a hospital, a task).",
        rich_help_panel="Your own data",
    ),
    metric: str | None = typer.Option(
        None,
        help="The main metric: accuracy, f1_macro, matthews_correlation (2 classes), pearson, spearmanr "
        "(regression), rougeL, exact_match (instructions). [default: the first of these the task reports]",
        rich_help_panel="Your own data",
    ),
    prompt_column: str | None = typer.Option(
        None, help="Instructions: the instruction column.", rich_help_panel="Your own data"
    ),
    input_column: str | None = typer.Option(
        None, help="Instructions: an optional input column.", rich_help_panel="Your own data"
    ),
    response_column: str | None = typer.Option(
        None, help="Instructions: the response column (trained on, scored by ROUGE-L).", rich_help_panel="Your own data"
    ),
    personal_holdout: float | None = typer.Option(
        None,
        help="Share of each client's own data held out and never trained on; at the end each client's own "
        "model (personalised rules) and the global model are scored on it too. [default: 0, none]",
    ),
    min_client_examples: int | None = typer.Option(
        None, help=f"Fewest examples a client holds under Dirichlet skew. [default: {_D.min_client_examples}]"
    ),
    superni_tasks_per_client: int | None = typer.Option(
        None, help=f"SuperNI: training tasks per client. [default: {_D.superni_tasks_per_client}]"
    ),
    superni_by_category: bool = typer.Option(
        False, "--superni-by-category", help="SuperNI: each client holds every training task of one category."
    ),
    superni_train_tasks: str | None = typer.Option(
        None, help="SuperNI: comma-separated training tasks to draw the clients' tasks from. [default: all 687]"
    ),
    superni_test_tasks: str | None = typer.Option(
        None, help="SuperNI: comma-separated unseen tasks to draw from. [default: the 103 official test tasks]"
    ),
    superni_eval_tasks: str | None = typer.Option(
        None, help=f"SuperNI: unseen tasks scored (spread over categories), or all. [default: {_D.superni_eval_tasks}]"
    ),
    superni_eval_instances: int | None = typer.Option(
        None, help=f"SuperNI: instances per unseen task. [default: {_D.superni_eval_instances}]"
    ),
    superni_seen_instances: int | None = typer.Option(
        None,
        help=f"SuperNI: held-out instances per client task (seen score; 0: none). "
        f"[default: {_D.superni_seen_instances}]",
    ),
    superni_num_examples: int | None = typer.Option(
        None, help=f"SuperNI: positive examples per prompt (0 allowed). [default: {_D.superni_num_examples}]"
    ),
    superni_max_target_length: int | None = typer.Option(
        None,
        help=f"SuperNI: target tokens trained on (the prompt gets --max-length minus this). "
        f"[default: {_D.superni_max_target_length}]",
    ),
    superni_max_new_tokens: int | None = typer.Option(
        None, help=f"SuperNI: cap on generated tokens. [default: {_D.superni_max_new_tokens}]"
    ),
    out: Path | None = typer.Option(None, help="Run folder. [default: runs/TASK-RULE-CONFIGHASH]"),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run in --out from its last checkpoint."
    ),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Federated LoRA fine-tuning: a task, a rule and a federation in; a trained global adapter,
    per-round metrics and a summary table out."""
    from rich.console import Console

    from glora.experiments.tables import print_summary
    from glora.federation.simulation import run_federation

    given = {
        "task": task,
        "rule": rule,
        "backbone": backbone,
        "clients": clients,
        "alpha": alpha,
        "ranks": ranks,
        "rounds": rounds,
        "fraction": fraction,
        "local_steps": local_steps,
        "local_epochs": local_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "head_lr": head_lr,
        "head_lr_ratio": head_lr_ratio,
        "logit_adjustment": logit_adjustment,
        "pooling": pooling,
        "max_length": max_length,
        "eval_every": eval_every,
        "eval_batch_size": eval_batch_size,
        "eval_ranks": eval_ranks,
        "max_train_examples": max_train_examples,
        "max_eval_examples": max_eval_examples,
        "weighting": weighting,
        "eval_split": eval_split,
        "seed": seed,
        "threads": threads,
        "device": device,
        "data_dir": data_dir,
        "target_modules": tuple(target_modules.split(",")) if target_modules else None,
        "dataset": dataset,
        "dataset_config": dataset_config,
        "dataset_revision": dataset_revision,
        "validation_fraction": validation_fraction,
        "text_column": text_column,
        "text_pair_column": text_pair_column,
        "label_column": label_column,
        "regression": regression,
        "partition_column": partition_column,
        "metric": metric,
        "prompt_column": prompt_column,
        "input_column": input_column,
        "response_column": response_column,
        "min_client_examples": min_client_examples,
        "dtype": dtype,
        "grad_accum_steps": grad_accum_steps,
        "max_grad_norm": max_grad_norm,
        "report_to": report_to,
        "personal_holdout": personal_holdout,
        "superni_tasks_per_client": superni_tasks_per_client,
        "superni_train_tasks": superni_train_tasks,
        "superni_test_tasks": superni_test_tasks,
        "superni_eval_instances": superni_eval_instances,
        "superni_seen_instances": superni_seen_instances,
        "superni_num_examples": superni_num_examples,
        "superni_max_target_length": superni_max_target_length,
        "superni_max_new_tokens": superni_max_new_tokens,
    }
    flags = {
        "random_gauge": random_gauge,
        "rslora": rslora,
        "superni_by_category": superni_by_category,
        "record_updates": record_updates,
        "load_in_4bit": load_in_4bit,
        "load_in_8bit": load_in_8bit,
        "gradient_checkpointing": gradient_checkpointing,
    }
    folder: Path | None = None
    try:
        if superni_eval_tasks is not None:
            given["superni_eval_tasks"] = _count_or_all("--superni-eval-tasks", superni_eval_tasks)
        # One dict, then from_dict: the task's defaults fill whatever neither the file nor
        # the command line sets.
        values = RunConfig.read_toml(config) if config else {}
        values.update({k: v for k, v in given.items() if v is not None})
        if values.get("dataset") and "task" not in values:
            # Your own data: the columns given say which kind of task it is.
            values["task"] = "instructions" if values.get("response_column") else "classification"
        values.update({k: True for k, v in flags.items() if v})
        cfg = RunConfig.from_dict(values)
        if iid:
            cfg = cfg.replace(alpha=None)
        if hub:
            cfg = cfg.replace(data_source="hub")
        if rule_option:
            cfg = cfg.replace(rule_options={**cfg.rule_options, **_rule_options(rule_option)})
        folder = out or Path("runs") / f"{cfg.task}-{cfg.rule}-{cfg.identity()}"
        summary = run_federation(cfg, folder, resume=resume, progress=progress)
    except (ValueError, FileNotFoundError) as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        if folder is not None:
            _interrupted(folder, out)
        raise typer.Exit(130) from None
    print_summary(summary, folder)


def _interrupted(folder: Path, out: Path | None) -> None:
    """What Ctrl-C leaves, and the exact command that continues it."""
    import shlex
    import sys

    from rich.console import Console

    from glora.federation.results import RunStore

    rows = RunStore(folder).metrics() if folder.exists() else []
    args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    args += ["--out", str(folder)] if out is None else []
    done = f"rounds up to {rows[-1]['round']} are saved" if rows else "no round had finished"
    Console(stderr=True).print(
        f"[yellow]interrupted[/yellow]: {done} in {folder}; continue from the last checkpoint with:\n"
        f"  {shlex.join(['glora', *args])}",
        soft_wrap=True,
    )


def _count_or_all(option: str, text: str) -> int | None:
    """A positive count, or None for 'all'."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{option} {text!r}: give a number of tasks or 'all'") from None


def _csv(text: str | None, kind: type = str) -> list | None:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()] if text else None
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give comma-separated values, e.g. 0,1,2") from None


def _packaged_presets() -> list[str]:
    from importlib import resources

    folder = resources.files("glora.experiments").joinpath("presets")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


@app.command()
def sweep(
    preset: str = typer.Argument(
        ..., help=f"A packaged preset ({', '.join(_packaged_presets())}) or a path to a preset TOML file."
    ),
    results: Path | None = typer.Option(None, help="Results folder. [default: runs/sweeps/PRESET-NAME]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs, their status and the estimated time."),
    seeds: str | None = typer.Option(None, help="Only these of the preset's seeds, comma-separated (e.g. 0)."),
    only_rules: str | None = typer.Option(None, help="Only these rules, comma-separated."),
    only_tasks: str | None = typer.Option(None, help="Only these tasks, comma-separated."),
    only_settings: str | None = typer.Option(None, help="Only these settings, comma-separated."),
    threads: int | None = typer.Option(None, help="torch CPU threads per run (not part of a run's identity)."),
    progress: bool = typer.Option(True, help="Progress bars."),
    lr_from: Path | None = typer.Option(
        None,
        help="Results folder of a tuning sweep (e.g. lr-tuning): its chosen learning rate per task, picked on "
        "held-out training data, replaces the preset's in every run.",
    ),
    report_to: str = typer.Option(
        "", help="Log every run to these trackers too (tensorboard, mlflow, wandb; one tracked run per grid cell)."
    ),
    lr_per_rule: bool = typer.Option(
        False,
        "--lr-per-rule",
        help="With --lr-from: each rule takes its own tuned rate (its best held-out mean over seeds) instead of "
        "the task's rate shared by every rule.",
    ),
    reuse_from: str | None = typer.Option(
        None,
        help="Other sweeps' results folders, or folders of `glora run --out` folders, comma-separated: their "
        "finished runs with the same identity (the same resolved config) are linked into --results instead of "
        "being run again.",
    ),
) -> None:
    """Run a preset's grid (rules x settings x tasks x seeds): finished runs are skipped,
    interrupted ones resumed, failing ones recorded; re-run the command to continue."""
    from rich.console import Console

    from glora.experiments.sweep import sweep_command

    try:
        sweep_command(
            preset,
            results,
            dry_run,
            _csv(seeds, int),
            _csv(only_rules),
            _csv(only_tasks),
            _csv(only_settings),
            threads,
            progress,
            lr_from=lr_from,
            reuse_from=_csv(reuse_from, Path),
            lr_per_rule=lr_per_rule,
            report_to=report_to,
        )
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def report(
    results_dir: Path = typer.Argument(..., help="The --results folder of a `glora sweep`."),
    out: Path | None = typer.Option(None, help="Where report.md, report.csv and plots/ go. [default: RESULTS_DIR]"),
    plots: bool = typer.Option(True, help="Write PNG plots."),
    last_evals: int = typer.Option(
        1,
        help="Also tabulate each seed's mean over its last K evaluations of the global model (steadier than "
        "the final round when few clients are sampled a round); 1: the final round only.",
    ),
) -> None:
    """Tables (markdown, CSV) and plots of a sweep: mean ± std over seeds, best marked."""
    from rich.console import Console

    from glora.experiments.report import write_report

    try:
        written = write_report(results_dir, out, plots=plots, last=last_evals)
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    Console().print(f"wrote {len(written)} files: {written['report.md']}, {written['report.csv']}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Server cost of every aggregation rule: time, memory and traffic of one round (runs
    benchmarks/aggregation.py with these arguments; `glora bench --help` lists them)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "aggregation.py"
    if not script.exists():
        typer.echo(f"error: {script} not found; glora bench runs from a source checkout (pip install -e .)", err=True)
        raise typer.Exit(2)
    raise typer.Exit(subprocess.call([sys.executable, str(script), *ctx.args]))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run folder (of `glora run` or a sweep)."),
    merged: Path = typer.Option(..., "--merged", help="Where to write the merged full model folder."),
) -> None:
    """A merged full model (base + adapter + head) that transformers' AutoModel* load without
    glora (a mean-pooled classifier with trust_remote_code=True)."""
    from rich.console import Console

    from glora.federation.results import ADAPTER, RunStore
    from glora.models.export import merge_adapter

    store = RunStore(run_dir)
    try:
        saved = store.config()
        if saved is None or not store.path(ADAPTER).is_dir():
            raise ValueError(f"{run_dir} holds no finished run (config.json and adapter/): give a run folder")
        folder = merge_adapter(store.path(ADAPTER), saved["backbone"], merged)
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    Console().print(f"wrote {folder}")


@app.command()
def replay(
    results_dir: Path = typer.Argument(
        ..., help="A sweep folder whose runs recorded their updates (--record-updates)."
    ),
    out: Path = typer.Option(..., help="Folder for rows.jsonl (one row per run, round, candidate) and report.md."),
    rounds: str = typer.Option("3,6", help="Recorded rounds to replay, comma-separated."),
    max_eval_examples: int | None = typer.Option(
        None, help="Score on the first N examples of each run's evaluation split. [default: all]"
    ),
    threads: int = typer.Option(1, help="torch CPU threads."),
    title: str = typer.Option("Replayed server steps", help="Title of report.md."),
    only_settings: str | None = typer.Option(None, help="Only the runs of these settings, comma-separated."),
) -> None:
    """Replay every server rule and GLoRA variant on the same recorded client updates: distance
    to the exact mean, the global model's loss and metric, cost. Run folders are only read; rows
    append to OUT/rows.jsonl, so an interrupted replay continues."""
    from rich.console import Console

    from glora.experiments.replay import read_rows, replay_sweep, report_markdown

    try:
        rows_file = out / "rows.jsonl"
        written = replay_sweep(
            results_dir,
            rows_file,
            _csv(rounds, int),
            max_eval_examples=max_eval_examples,
            threads=threads,
            settings=_csv(only_settings),
        )
        if not rows_file.exists():
            raise ValueError(f"{results_dir} has no finished run to replay yet")
        (out / "report.md").write_text(report_markdown(read_rows(rows_file), title))
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    Console().print(f"{written} rows added to {rows_file}; report: {out / 'report.md'}")


@app.command()
def aggregate(
    adapters: list[Path] = typer.Argument(
        ..., help="The clients' peft adapter folders (adapter_config.json + adapter weights); any ranks."
    ),
    rule: str = typer.Option("glora", help="Aggregation rule (see README)."),
    weights: str | None = typer.Option(
        None, help="Client weights, comma-separated, one per adapter (e.g. example counts). [default: equal]"
    ),
    rule_option: list[str] = typer.Option(
        [], "--rule-option", help="Rule option key=value, repeatable (e.g. rank=16)."
    ),
    out: Path = typer.Option(..., help="Folder for global/ and rank-R/ (each replaced if present)."),
) -> None:
    """The server's aggregate of client LoRA adapters (peft adapter folders, any ranks) as
    peft adapters that PeftModel.from_pretrained loads: OUT/global/ (the full update) and
    OUT/rank-R/ for each client rank R (what a client of that rank receives). The heads
    (modules_to_save, e.g. a classifier) are averaged by weight. For rules that merge into
    the base weights (flora, florist, fedex-lora, glora with restart), rank-R/ holds the total
    update a client carries, not a rank-R adapter."""
    from glora.peft_server import aggregate_adapters, write_adapters

    try:
        w = None if weights is None else _csv(weights, float)
        result = aggregate_adapters(adapters, w, rule, **_rule_options(rule_option))
        write_adapters(out, result)
    except (ValueError, typer.BadParameter) as e:
        typer.echo("error: " + " ".join(str(e).split()), err=True)  # one line, whatever the message
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out / 'global'} (rank {result['configs']['global'].r}: the full update)")
    for name in dict.fromkeys(result["clients"]):
        clients = [str(i) for i, n in enumerate(result["clients"]) if n == name]
        typer.echo(f"wrote {out / name} (received by client{'s' * (len(clients) > 1)} {', '.join(clients)})")


@app.command()
def table(folders: list[Path] = typer.Argument(..., help="Run folders (of `glora run`).")) -> None:
    """A markdown table of individual runs: metric at each evaluated round, per rank, cost."""
    from glora.experiments.runs_table import runs_markdown

    typer.echo(runs_markdown(folders), nl=False)


if __name__ == "__main__":
    app()
