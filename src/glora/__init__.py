"""glora: federated fine-tuning of language models with LoRA, aggregating what the
clients' adapters mean (their updates) rather than the factors that represent them."""

from glora.aggregation import RULES, get_rule
from glora.lowrank import LowRank

__version__ = "0.1.0"

__all__ = ["RULES", "LowRank", "__version__", "get_rule"]
