"""glora: federated fine-tuning of language models with LoRA, aggregating what the
clients' adapters mean (their updates) rather than the factors that represent them."""

__version__ = "0.1.0"

__all__ = ["RULES", "LowRank", "__version__", "aggregate_adapters", "get_rule"]


def __getattr__(name: str):
    # Imported on first use: the rules need torch and aggregate_adapters needs peft (seconds
    # to import, transformers included), which `import glora` should not cost every CLI call
    # and every Flower node message (a forwarded one needs neither).
    if name == "aggregate_adapters":
        from glora.peft_server import aggregate_adapters

        return aggregate_adapters
    if name in ("RULES", "get_rule"):
        import glora.aggregation

        return getattr(glora.aggregation, name)
    if name == "LowRank":
        from glora.lowrank import LowRank

        return LowRank
    raise AttributeError(f"module 'glora' has no attribute {name!r}")
