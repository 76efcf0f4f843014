# The README's commands. Each installs what it needs first: `make run` only what
# serving needs, `make test` and `make lint` the dev extra too.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SERVE   = $(VENV)/.installed-serve
DEV     = $(VENV)/.installed-dev

.PHONY: install run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip

$(SERVE): pyproject.toml | $(BIN)/python
	@echo "installing sserelay into $(VENV) (first run only)"
	$(BIN)/pip install --progress-bar on -e .
	touch $(SERVE)

$(DEV): pyproject.toml | $(BIN)/python
	@echo "installing sserelay and its dev tools into $(VENV)"
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	touch $(SERVE) $(DEV)

install: $(DEV)

run: $(SERVE)
	$(BIN)/sserelay serve

test: $(DEV)
	$(BIN)/python -m pytest

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(DEV)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

$(VENV)/.installed-bench: $(DEV)
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
