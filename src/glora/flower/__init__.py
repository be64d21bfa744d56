"""GLoRA and every registered rule as a Flower app (flwr 1.42, Message API).

``server_app:app`` and ``client_app:app`` are the components named in pyproject.toml's
``[tool.flwr.app.components]``; ``strategy.RuleStrategy`` is the rule as a Flower strategy.
Needs the optional extra ``flower`` (``pip install -e ".[flower]"``; ``simulation`` for Ray).
"""
