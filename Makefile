# log-bridge: `make run` starts a local receiver, `make test` runs the whole suite, `make bench` the benchmarks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run` needs only what serving needs (every sink's SDK, no test or deploy-check tools).
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test,deploy-checks]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/log-bridge serve --config examples/local.yaml

test: $(STAMP)
	$(BIN)/ruff check receiver sinks tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check receiver sinks tests bench
	$(BIN)/ruff format --check receiver sinks tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data log-bridge-data .pytest_cache .mypy_cache .ruff_cache
