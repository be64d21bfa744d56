"""Run the example in Flower's simulation engine (Ray): 3 virtual nodes of LoRA ranks 2, 4
and 8, 2 rounds; the global adapter lands in ./global-adapter.

    python examples/flower-peft/simulate.py
"""

from client_app import app as client_app
from flwr.simulation import run_simulation
from server_app import app as server_app


def main() -> None:
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}},
    )


if __name__ == "__main__":
    main()
