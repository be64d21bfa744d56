"""The ``glora`` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

from pathlib import Path

import typer

from glora.federation.config import RunConfig
from glora.run_command import parse_key_values, run_command

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


def _execute(cfg: RunConfig, folder: Path, resume: bool, progress: bool) -> None:
    """Run the federation; on Ctrl-C, say what is saved and how to continue."""
    from glora.experiments.tables import print_summary
    from glora.federation.simulation import run_federation

    try:
        summary = run_federation(cfg, folder, resume=resume, progress=progress)
    except KeyboardInterrupt:
        _interrupted(folder)
        raise typer.Exit(130) from None
    print_summary(summary, folder)


app.command(name="run")(run_command(RunConfig, _execute))


@app.command()
def config(
    task: str = typer.Option(RunConfig.task, help="The task whose defaults fill the file."),
    flower: bool = typer.Option(
        False, "--flower", help="The [tool.flwr.app.config] section of a Flower app instead (pyproject.toml)."
    ),
) -> None:
    """Every run option as TOML, with its help: a file for `glora run --config`, or (--flower)
    the section a Flower app's pyproject.toml declares."""
    from glora.federation.config_template import run_toml
    from glora.flower.config import flower_toml

    try:
        typer.echo(flower_toml() if flower else run_toml(RunConfig.for_task(task)), nl=False)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _interrupted(folder: Path) -> None:
    """What Ctrl-C leaves, and the exact command that continues it."""
    import shlex
    import sys

    from rich.console import Console

    from glora.federation.results import RunStore

    rows = RunStore(folder).metrics() if folder.exists() else []
    args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    args += [] if "--out" in sys.argv else ["--out", str(folder)]
    done = f"rounds up to {rows[-1]['round']} are saved" if rows else "no round had finished"
    Console(stderr=True).print(
        f"[yellow]interrupted[/yellow]: {done} in {folder}; continue from the last checkpoint with:\n"
        f"  {shlex.join(['glora', *args])}",
        soft_wrap=True,
    )


def _csv(text: str | None, kind: type = str) -> list | None:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()] if text else None
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give comma-separated values, e.g. 0,1,2") from None


def _packaged_presets() -> list[str]:
    from importlib import resources

    # Listed without importing glora.experiments.grid.preset (and torch with it): the help
    # text below is built whenever the CLI is imported.
    folder = resources.files("glora.experiments.grid").joinpath("presets")
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
    import shlex

    from rich.console import Console

    from glora.experiments.grid.preset import load_preset
    from glora.experiments.sweep.command import sweep_command

    try:
        grid = load_preset(preset)
        folder = results or Path("runs") / "sweeps" / grid.name
        picked_seeds, rules, tasks, settings = _csv(seeds, int), _csv(only_rules), _csv(only_tasks), _csv(only_settings)
        sources = _csv(reuse_from, Path)
        # The command that sweep.json records and an interrupted sweep prints: the options that
        # choose the runs, with the results folder spelled out so that it re-runs into this one;
        # --threads and --no-progress change how the runs go, not which, and are left out.
        parts = ["glora", "sweep", preset, "--results", str(folder)]
        chosen = (
            ("--seeds", picked_seeds),
            ("--only-rules", rules),
            ("--only-tasks", tasks),
            ("--only-settings", settings),
            ("--lr-from", [lr_from] if lr_from is not None else None),
            ("--reuse-from", sources),
        )
        for flag, values in chosen:
            if values:
                parts += [flag, ",".join(str(v) for v in values)]
        if lr_per_rule:
            parts.append("--lr-per-rule")
        if report_to:
            parts += ["--report-to", report_to]
        sweep_command(
            grid,
            folder,
            shlex.join(parts),
            dry_run,
            picked_seeds,
            rules,
            tasks,
            settings,
            threads,
            progress,
            lr_from=lr_from,
            reuse_from=sources,
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

    from glora.experiments.render.report import write_report

    try:
        written = write_report(results_dir, out, plots=plots, last=last_evals)
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    Console().print(f"wrote {len(written)} files: {written['report.md']}, {written['report.csv']}")


@app.command()
def budget(
    results_dir: Path = typer.Argument(..., help="The --results folder of a finished pilot sweep (budget-pilot)."),
    tolerance: float = typer.Option(0.01, help="How close the score at R must be to the score at 2R (0.01: 1 point)."),
    candidates: str = typer.Option(
        "", help="Candidate budgets R, comma-separated. [default: the first evaluated round, doubled]"
    ),
) -> None:
    """The round budget a pilot sweep gives: the smallest R at which every rule's seed-mean
    score is within TOLERANCE of its score at 2R. Reads the runs, writes nothing."""
    from rich.console import Console

    from glora.experiments.budget import budget_markdown, pilot_budgets
    from glora.experiments.sweep_results import load_results

    try:
        res = load_results(results_dir)
        rounds = _whole_numbers(candidates, "--candidates") or None
        texts = [budget_markdown(b) for b in pilot_budgets(res, tolerance, rounds)]
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    print("\n".join(texts), end="")


@app.command()
def rates(
    results_dir: Path = typer.Argument(..., help="The --results folder of a tuning sweep (e.g. lr-tuning-rules)."),
) -> None:
    """Each rule's held-out score at every learning rate of a tuning sweep (seed-mean, n seeds)
    and the rate `glora sweep --lr-from RESULTS_DIR --lr-per-rule` gives it, as a markdown
    table. Reads the runs, writes nothing."""
    from rich.console import Console

    from glora.experiments.grid.tuned import rate_table
    from glora.experiments.sweep_results import load_results

    try:
        text = rate_table(load_results(results_dir))
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    print(text, end="")


def _whole_numbers(text: str, option: str) -> list[int]:
    """Comma-separated positive whole numbers; ValueError naming ``option`` otherwise."""
    parts = [c.strip() for c in text.split(",") if c.strip()]
    if not all(c.isdigit() and int(c) > 0 for c in parts):
        raise ValueError(f"{option} takes positive whole numbers, comma-separated (e.g. 10,20,40), not {text!r}")
    return [int(c) for c in parts]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Server cost of every aggregation rule: time, memory and traffic of one round, written
    to results/bench/ (`glora bench --help` lists the options; glora.experiments.bench)."""
    from glora.experiments.bench.main import main as run_bench

    # The benchmark parses its own options; the command line recorded with its numbers is this one.
    run_bench(ctx.args, command=" ".join(["glora", "bench", *ctx.args]), prog="glora bench")


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


@app.command(name="node-worker")
def node_worker(
    socket: Path = typer.Option(..., "--socket", help="The Unix socket to serve (give the same path as worker=)."),
) -> None:
    """Keep the backbone loaded on a Flower node: a SuperNode started with
    `--node-config "... worker='SOCKET'"` hands its train messages to this process instead of
    loading the model in a fresh process for every message (glora.flower.node_worker)."""
    from rich.console import Console

    try:
        from glora.flower.node_worker import serve
        from glora.flower.training import serve_request
    except ImportError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}: install the Flower extra (pip install -e '.[flower]')")
        raise typer.Exit(2) from None
    try:
        serve(socket, serve_request, ready=lambda: Console().print(f"node worker serving {socket} (Ctrl-C stops it)"))
    except OSError as e:  # a worker serving the socket already, a path too long for a socket
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


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
        result = aggregate_adapters(adapters, w, rule, **parse_key_values(rule_option, "--rule-option"))
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
    from glora.experiments.render.runs_table import runs_markdown

    typer.echo(runs_markdown(folders), nl=False)


if __name__ == "__main__":
    app()
