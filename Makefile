# Everything starts from here: on a fresh machine with Python 3.11, `make run` and `make test` do all set-up.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench bench-artifacts clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python >= 3.11 required; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/mlflow-gateway dev

lint: install
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix gateway tests bench
	$(BIN)/ruff format gateway tests bench

test: install lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/passthrough.py

bench-artifacts: install
	$(BIN)/python bench/artifacts.py

clean:
	rm -rf $(VENV) .gateway-dev .pytest_cache .mypy_cache .ruff_cache
