"""The ``glora`` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning with GLoRA.")


@app.callback()
def main() -> None:
    """glora: aggregate what the clients' adapters mean, not the factors that represent them."""


@app.command()
def demo(seed: int = typer.Option(0, help="Seed of the synthetic client updates.")) -> None:
    """Aggregate real-shaped LoRA updates with GLoRA, FedIT and a dense SVD, and compare."""
    from glora.experiments.demo import print_demo, run_demo

    print_demo(run_demo(seed))


if __name__ == "__main__":
    app()
