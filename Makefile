# One-command set-up on a fresh machine (Python 3.11, pip, no GPU).
#   make demo   create .venv, install torch 2.13.0 (CPU wheel) first, then gkd, then run `gkd demo`
#   make test   same set-up, then lint and the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/.gkd-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/.gkd-installed
	$(BIN)/gkd demo $(ARGS)

test: $(BIN)/.gkd-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest $(ARGS)

lint: $(BIN)/.gkd-installed
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
