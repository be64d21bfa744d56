"""A Flower ServerApp that aggregates plain peft clients of different LoRA ranks with GLoRA."""

from client_app import peft_model
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import LoraConfig, get_peft_model_state_dict

from glora.flower import GLoRAStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # lora_alpha: the clients' (16 at every rank). The initial arrays are a client's state
    # dict, as with FedAvg; the nodes receive only its head (modules_to_save) and start from
    # their own fresh adapters until the server has seen their ranks.
    strategy = GLoRAStrategy(lora_alpha=16, min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    strategy.start(grid, ArrayRecord(get_peft_model_state_dict(peft_model(8))), num_rounds=2)
    strategy.save_global("global-adapter", LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
