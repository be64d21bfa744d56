"""GLoRA and every registered rule as a Flower app (flwr 1.42, Message API).

``server_app:app`` and ``client_app:app`` are the components named in pyproject.toml's
``[tool.flwr.app.components]``; ``strategy.RuleStrategy`` is the rule as a Flower strategy.
For other people's Flower apps, whose clients send and load plain peft state dicts,
``GLoRAStrategy`` (:mod:`glora.flower.peft_strategy`) serves any rule those clients can follow.
Needs the optional extra ``flower`` (``pip install -e ".[flower]"``; ``simulation`` for Ray).
"""

__all__ = ["GLoRAStrategy"]


def __getattr__(name: str):
    # Imported on first use: it needs peft (seconds to import, transformers included), which
    # this package's own ClientApp spares the messages that do not train.
    if name == "GLoRAStrategy":
        from glora.flower.peft_strategy import GLoRAStrategy

        return GLoRAStrategy
    raise AttributeError(f"module 'glora.flower' has no attribute {name!r}")
