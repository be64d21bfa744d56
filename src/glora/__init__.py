"""glora: federated fine-tuning of language models with LoRA, aggregating what the
clients' adapters mean (their updates) rather than the factors that represent them."""

from glora.aggregation import RULES, get_rule
from glora.lowrank import LowRank

__version__ = "0.1.0"

__all__ = ["RULES", "LowRank", "__version__", "aggregate_adapters", "get_rule"]


def __getattr__(name: str):
    # Imported on first use: it needs peft, whose import (transformers included) takes seconds
    # that `import glora` should not cost every Flower node message and CLI call.
    if name == "aggregate_adapters":
        from glora.peft_server import aggregate_adapters

        return aggregate_adapters
    raise AttributeError(f"module 'glora' has no attribute {name!r}")
