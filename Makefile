# The README's quick start uses two targets: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
CONFIG ?= examples/quickstart.toml

.PHONY: venv run test lint typecheck unit bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@if [ -e /usr/include/libmilter/mfapi.h ]; then $(BIN)/pip install -q -e '.[dev,milter]'; \
	else echo "note: no libmilter headers (apt-get install libmilter-dev): milter mode not installed"; fi
	touch $@

venv: $(BIN)/.installed

## run the filter on the embedded default (SQLite + Maildir under ./var, listens on 127.0.0.1:2525)
run: venv
	$(BIN)/sourceauth serve --config $(CONFIG)

## lint, type-check and run the whole test suite (what CI runs)
test: venv lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

lint: venv
	$(BIN)/ruff check engine adapters benchmarks tests

typecheck: venv
	$(BIN)/mypy --strict -p sourceauth.engine

unit: venv
	$(BIN)/pytest -q tests/unit

## the benchmark harness (figures are ratios against baselines measured in the same run)
bench: venv
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
